"""DiffuRec's approximator with the last Transformer block computed for the last row only
(``last_only``, recsys_dist/models/transformer.py) against the same blocks computed for every
row, alternating in one process (the reference timed in the same job):

    PYTHONPATH=. python benchmarks/transformer_last_row.py [--rounds 6] [--batch 128]

At the official DiffuRec configuration (configs/ml1m_diffurec.yaml with d 128, 4 blocks x 4
heads, max_len 50), one thread, eval mode: prints the largest difference between the two
outputs, each variant's milliseconds per call over ``--rounds`` rounds of 8 calls, and the
ratio of the medians. One call = one reverse step (or the forward of one training query batch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from recsys_dist.config import REPO_ROOT, load_config
    from recsys_dist.diffusion import timestep_embedding
    from recsys_dist.models import build_model
    from recsys_dist.models.transformer import attention_mask

    cfg = load_config(REPO_ROOT / "configs/ml1m_diffurec.yaml", ["model.dim=128", "model.num_blocks=4", "model.num_heads=4"])
    model = build_model(cfg.model, cfg.data.max_len).eval()
    B, L, d = args.batch, cfg.data.max_len, cfg.model.dim
    g = torch.Generator().manual_seed(0)
    hist = torch.randn(B, L, d, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, : L // 5] = False  # some padding, as in real histories
    x_t, t = torch.randn(B, d, generator=g), torch.full((B,), 5)
    lam = cfg.model.lambda_uncertainty * (1 + torch.randn(B, L, d, generator=g))

    def every_row() -> torch.Tensor:  # the official form's blocks, every row computed
        d_t = model.step_mlp(timestep_embedding(t.float() * (1000.0 / model.steps), d))
        x = model.norm(hist) * mask[..., None] + lam * (x_t + d_t)[:, None, :]
        attn = attention_mask(mask, causal=False)
        for block in model.encoder.blocks:
            x = block(x, attn)
        return model.encoder.ln(x[:, -1])

    def last_row() -> torch.Tensor:
        return model.approximate(hist, mask, x_t, t, lam)

    with torch.no_grad():
        print(f"largest |difference| of the outputs: {(every_row() - last_row()).abs().max().item():.2e}")
        times = {"every row": [], "last row": []}
        for _ in range(args.rounds):
            for name, fn in (("every row", every_row), ("last row", last_row)):
                t0 = time.perf_counter()
                for _ in range(8):
                    fn()
                times[name].append(1000 * (time.perf_counter() - t0) / 8)
    for name, v in times.items():
        print(f"{name}: " + " ".join(f"{x:.0f}" for x in v) + " ms a call")
    ratio = statistics.median(times["every row"]) / statistics.median(times["last row"])
    print(f"ratio of medians (every row / last row): {ratio:.2f}x at B {B}, L {L}, d {d}, "
          f"{len(model.encoder.blocks)} blocks, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
