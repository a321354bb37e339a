"""DiffRec with its N-wide layers in the sharded item table equals the dense single-process
reference (``recsys_dist.models.diffrec.DiffRec``) on the same global batches.

The sharded job runs on 2 real gloo ranks (row-wise sharded table, fused SGD; or the replicated
table with AdamW); the reference is one process holding in_proj / out_proj as dense layers,
started from the same weights and fed the same timesteps, noise and dropout masks (drawn for
all N columns from the streams the ranks draw their column blocks from). Three settings: the
row-wise table with fused SGD, the replicated table with SGD (T-DiffRec weights, input
normalisation) and the replicated table with AdamW (the ML-1M configs'). Compared over 20
steps: the per-step global loss (atol 1e-4 on losses of ~1-60: float summation order differs
in the split matmuls and the all-reduces) and the weights after the 20 updates, which carry
every gradient: SGD (scale-sensitive) atol 1e-5; AdamW bounded relative to how far the weights
moved (Adam's 1/sqrt(v) amplifies tiny gradient differences, as in test_sharded_training.py).
Then the sharded reverse chain, with 3 users on rank 0 and none on rank 1, must give every
item the score the dense model's ``infer`` gives on the same final weights (atol 1e-5).
"""

import numpy as np
import pytest
import torch

from distributed_harness import run_distributed

N_ITEMS, GLOBAL_B, STEPS, CHUNK = 37, 8, 20, 8


def _diffrec_cfg(variant: str = "diffrec", norm: bool = False):
    from recsys_dist.models.diffrec import DiffRecConfig
    return DiffRecConfig(variant=variant, norm=norm, dims=(6, 10), emb_size=4, steps=5, noise_scale=1.0,
                         noise_min=0.1, noise_max=0.5, history_num_per_term=2, dropout=0.5,
                         beta_fixed=False)  # beta_1 = 1e-5 would weigh t = 1 by 1e5: SGD diverges


def _batches():
    """STEPS global batches of users' train item lists (0-based item indices), jagged."""
    rng = np.random.default_rng(3)
    out = []
    for _ in range(STEPS):
        users = [rng.choice(N_ITEMS, size=rng.integers(1, 9), replace=False) for _ in range(GLOBAL_B)]
        out.append(users)
    return out


def _jagged(users):
    lens = torch.tensor([len(u) for u in users], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lens, 0)])
    items = torch.tensor(np.concatenate(users) if users else [], dtype=torch.long)
    return offsets, items


def _x0(users, cfg) -> torch.Tensor:
    """(B, N) dense x_0 as the official loaders build it (T-DiffRec: temporal weights)."""
    from recsys_dist.models.diffrec import interaction_matrix, temporal_weights

    pairs = np.array([[u, i] for u, items in enumerate(users) for i in items], dtype=np.int64)
    weights = temporal_weights(torch.as_tensor(pairs[:, 0]), cfg.w_min, cfg.w_max) if cfg.temporal else None
    return interaction_matrix(pairs, len(users), N_ITEMS, weights)


EVAL_USERS = 3  # rank 0 scores 3 users, rank 1 none: uneven eval batches


def _sharded(sharding: str, optimizer: str, variant: str = "diffrec", norm: bool = False):
    from recsys_dist.config import JobConfig
    import recsys_dist.sparse.wide as wide_mod
    from recsys_dist.train.diffrec_job import build_parts, score_queries, train_step
    from recsys_dist.distributed import init_distributed, seed_everything

    wide_mod.NOISE_CHUNK = CHUNK  # noise chunks straddle the shard boundary (rows 19 | 20 of 38)
    device = torch.device("cpu")
    rank, world = init_distributed(device)
    cfg = JobConfig()
    cfg.diffrec = _diffrec_cfg(variant, norm)
    cfg.sparse.sharding, cfg.sparse.optimizer, cfg.sparse.init_block_rows = sharding, optimizer, 16
    if optimizer == "sgd":
        cfg.sparse.lr, cfg.train.optimizer, cfg.train.lr = 0.05, "sgd", 0.05
    else:
        cfg.sparse.lr, cfg.train.optimizer, cfg.train.lr = 0.01, "adamw", 0.01
        cfg.sparse.betas = cfg.train.betas = (0.9, 0.999)
    cfg.train.grad_clip = 0.0
    b = GLOBAL_B // world
    cfg.train.batch_size = b
    seed_everything(0)
    engine, wide, _ = build_parts(cfg, N_ITEMS, device)
    initial = {"table": wide.table.full_table(), "core": {k: v.clone() for k, v in engine.module.core.state_dict().items()}}
    losses = []
    for step, users in enumerate(_batches()):
        offsets, items = _jagged(users[rank * b:(rank + 1) * b])
        losses.append(float(train_step(engine, wide, cfg.diffrec, offsets, items, step, seed=7)))
    offsets, items = _jagged(_batches()[0][:EVAL_USERS] if rank == 0 else [])
    queries = score_queries(engine.module, wide, cfg.diffrec, offsets, items)
    table = wide.table.full_table()
    h_in, h_out = wide.layout.in_width, wide.layout.out_width
    scores = queries @ table[1:, h_in:h_in + h_out + 1].t()  # what the evaluator ranks: (users, N)
    return {"initial": initial, "losses": torch.tensor(losses), "table": table, "scores": scores,
            "core": {k: v.detach().clone() for k, v in engine.module.core.state_dict().items()},
            "history": engine.module.diffusion.Lt_history.clone()}


def _dense_from(table, core, cfg):
    """A dense DiffRec holding the given table rows and core weights."""
    from recsys_dist.models.diffrec import DiffRec

    model = DiffRec(cfg, N_ITEMS)
    table = torch.as_tensor(table)
    h_in, h_out = model.denoiser.core.in_width, model.denoiser.core.out_width
    with torch.no_grad():
        model.denoiser.core.load_state_dict({k: torch.as_tensor(v) for k, v in core.items()})
        model.denoiser.in_proj.weight.copy_(table[1:, :h_in].t())
        model.denoiser.out_proj.weight.copy_(table[1:, h_in:h_in + h_out])
        model.denoiser.out_proj.bias.copy_(table[1:, h_in + h_out])
    return model


def _reference(initial, optimizer: str, variant: str = "diffrec", norm: bool = False):
    """The dense DiffRec, one process, same weights / timesteps / noise / dropout masks."""
    from recsys_dist.config import stream_seed
    from recsys_dist.sparse.wide import column_noise
    import recsys_dist.sparse.wide as wide_mod

    wide_mod.NOISE_CHUNK = CHUNK
    cfg = _diffrec_cfg(variant, norm)
    model = _dense_from(initial["table"], initial["core"], cfg)
    table = torch.as_tensor(initial["table"])
    params = list(model.denoiser.parameters())
    opt = (torch.optim.SGD(params, lr=0.05) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.999), weight_decay=0.0))
    model.train()
    losses = []
    for step, users in enumerate(_batches()):
        x0 = _x0(users, cfg)
        gen = torch.Generator().manual_seed(stream_seed(7, "diffrec-t", step))
        noise = {"t_u": torch.rand(GLOBAL_B, generator=gen, dtype=torch.float64),
                 "eps": column_noise(7, "diffrec-eps", step, GLOBAL_B, 0, N_ITEMS),
                 "drop_mask": column_noise(7, "diffrec-dropout", step, GLOBAL_B, 0, N_ITEMS, "uniform") >= cfg.dropout}
        opt.zero_grad()
        loss = model.loss(x0, noise)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    d = model.denoiser
    rows = torch.cat([d.in_proj.weight.t(), d.out_proj.weight, d.out_proj.bias[:, None]], dim=1)
    rows = torch.cat([rows, torch.zeros(N_ITEMS, table.shape[1] - rows.shape[1])], dim=1)  # the zero pad columns
    table_out = torch.cat([torch.zeros(1, table.shape[1]), rows])
    return {"losses": torch.tensor(losses), "table": table_out.detach(),
            "core": {k: v.detach() for k, v in d.core.state_dict().items()},
            "history": model.diffusion.Lt_history.clone()}


def _distance(a: dict, b: dict) -> float:
    return sum(float(((torch.as_tensor(a[k]) - torch.as_tensor(b[k])) ** 2).sum()) for k in a) ** 0.5


@pytest.mark.parametrize("sharding,optimizer,variant,norm", [
    ("row_wise", "sgd", "diffrec", False),  # the fused kernel's gradient scale
    ("data_parallel", "sgd", "t-diffrec", True),  # the replicated table's gradient scale, weights, norm
    ("data_parallel", "adamw", "diffrec", False),  # the ML-1M configs' optimizer
])
def test_two_sharded_ranks_equal_the_dense_reference(sharding, optimizer, variant, norm):
    two = run_distributed(_sharded, 2, sharding, optimizer, variant, norm)
    ref = _reference(two[0]["initial"], optimizer, variant, norm)
    assert (two[0]["table"] == two[1]["table"]).all()
    for k in two[0]["core"]:  # data-parallel replicas stay identical
        assert (two[0]["core"][k] == two[1]["core"][k]).all(), k
    sharded_losses = torch.as_tensor(two[0]["losses"])
    assert torch.allclose(sharded_losses, ref["losses"], atol=1e-4, rtol=1e-5), (sharded_losses, ref["losses"])
    assert torch.allclose(torch.as_tensor(two[0]["history"]), ref["history"], atol=1e-4, rtol=1e-5)
    table0, table = torch.as_tensor(two[0]["initial"]["table"]), torch.as_tensor(two[0]["table"])
    assert (table[0] == 0).all(), "the padding row never trains"
    assert (table - table0).abs().max() > 1e-3, "the table did not train"
    if optimizer == "sgd":
        assert torch.allclose(table, ref["table"], atol=1e-5), (table - ref["table"]).abs().max()
        for k in ref["core"]:
            assert torch.allclose(torch.as_tensor(two[0]["core"][k]), ref["core"][k], atol=1e-5), k
    else:
        travel = float((ref["table"] - table0).norm())
        assert float((table - ref["table"]).norm()) <= 0.01 * travel
        core0 = two[0]["initial"]["core"]
        assert _distance(two[0]["core"], ref["core"]) <= 0.01 * _distance(ref["core"], core0)
    # evaluation: the sharded reverse chain (3 users on rank 0, none on rank 1) scores every item
    # as the dense model's infer() on the same final weights does
    cfg = _diffrec_cfg(variant, norm)
    dense = _dense_from(two[0]["table"], two[0]["core"], cfg).eval()
    with torch.no_grad():
        expected = dense.infer(_x0(_batches()[0][:EVAL_USERS], cfg))
    scores = torch.as_tensor(two[0]["scores"])
    assert scores.shape == (EVAL_USERS, N_ITEMS) and torch.as_tensor(two[1]["scores"]).shape[0] == 0
    assert torch.allclose(scores, expected, atol=1e-5, rtol=1e-4), (scores - expected).abs().max()


def test_column_noise_is_world_size_independent():
    from recsys_dist.sparse.wide import column_noise

    full = column_noise(1, "x", 3, 5, 0, 50, chunk=8)
    parts = torch.cat([column_noise(1, "x", 3, 5, lo, hi, chunk=8) for lo, hi in [(0, 13), (13, 17), (17, 50)]], dim=1)
    assert torch.equal(full, parts)
    assert not torch.equal(full, column_noise(1, "x", 4, 5, 0, 50, chunk=8))


# ------------------------------------------------------------------------------------ L-DiffRec

LATENT_LR = {"sgd": 0.05, "adamw": 0.01}
CLUSTERS = torch.tensor([(j * 7) % 3 for j in range(N_ITEMS)])  # 3 interleaved clusters: every shard holds all


def _latent_cfg():
    from recsys_dist.models.diffrec import DiffRecConfig
    return DiffRecConfig(variant="l-diffrec", n_cate=3, ae_dims=(12,), dims=(8,), emb_size=4, steps=5,
                         noise_scale=1.0, noise_min=0.1, noise_max=0.5, history_num_per_term=2, dropout=0.5,
                         ae_dropout=0.1, vae_anneal_steps=10, beta_fixed=False)


def _sharded_latent(sharding: str, optimizer: str):
    from recsys_dist.config import JobConfig
    import recsys_dist.sparse.wide as wide_mod
    from recsys_dist.train.diffrec_job import build_parts, ldiffrec_train_step, score_queries
    from recsys_dist.distributed import init_distributed, seed_everything

    wide_mod.NOISE_CHUNK = CHUNK
    device = torch.device("cpu")
    rank, world = init_distributed(device)
    cfg = JobConfig()
    cfg.diffrec = _latent_cfg()
    cfg.sparse.sharding, cfg.sparse.optimizer, cfg.sparse.init_block_rows = sharding, optimizer, 16
    cfg.sparse.betas = cfg.train.betas = (0.9, 0.999)
    lr = LATENT_LR[optimizer]
    cfg.sparse.lr, cfg.train.optimizer, cfg.train.lr = lr, optimizer, lr
    cfg.train.grad_clip = 0.0
    b = GLOBAL_B // world
    cfg.train.batch_size = b
    seed_everything(0)
    engine, wide, cluster_block = build_parts(cfg, N_ITEMS, device, CLUSTERS)
    initial = {"table": wide.table.full_table(), "dense": {k: v.clone() for k, v in engine.module.state_dict().items()}}
    losses = []
    for step, users in enumerate(_batches()):
        offsets, items = _jagged(users[rank * b:(rank + 1) * b])
        losses.append(float(ldiffrec_train_step(engine, wide, cfg.diffrec, cluster_block, offsets, items, step,
                                                seed=7, epoch=0)))
    offsets, items = _jagged(_batches()[0][:EVAL_USERS] if rank == 0 else [])
    queries = score_queries(engine.module, wide, cfg.diffrec, offsets, items, cluster_block=cluster_block)
    table = wide.table.full_table()
    lo, used = wide.layout.in_width, wide.layout.used
    return {"initial": initial, "losses": torch.tensor(losses), "table": table, "scores": queries @ table[1:, lo:used].t(),
            "dense": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}, "in_width": lo}


def _ldiffrec_from(table, dense, in_width, cfg):
    """A dense LDiffRec holding the given table rows and dense weights."""
    from recsys_dist.models.diffrec import LDiffRec

    model = LDiffRec(cfg, N_ITEMS, cluster_ids=CLUSTERS)
    table = torch.as_tensor(table)
    dense = {k: torch.as_tensor(v) for k, v in dense.items()}
    latent = model.latent_size
    with torch.no_grad():
        start = 0
        for c, (idx, enc) in enumerate(zip(model.vae.cluster_items, model.vae.encoders)):
            w = model.vae.latent_dims[c][-1]
            enc[0].weight.copy_(table[1 + idx, :2 * w].t())
            enc[0].bias.copy_(dense["enc_bias"][start:start + 2 * w])
            start += 2 * w
        model.vae.decoder.weight.copy_(table[1:, in_width:in_width + latent])
        model.vae.decoder.bias.copy_(table[1:, in_width + latent])
        model.denoiser.load_state_dict({k[len("denoiser."):]: v for k, v in dense.items() if k.startswith("denoiser.")})
        model.diffusion.load_state_dict({k[len("diffusion."):]: v for k, v in dense.items() if k.startswith("diffusion.")})
    return model


def _reference_latent(run, optimizer: str):
    from recsys_dist.config import stream_seed
    import recsys_dist.sparse.wide as wide_mod
    from recsys_dist.sparse.wide import column_noise

    wide_mod.NOISE_CHUNK = CHUNK
    cfg = _latent_cfg()
    model = _ldiffrec_from(run["initial"]["table"], run["initial"]["dense"], run["in_width"], cfg)
    params = list(model.parameters())
    lr = LATENT_LR[optimizer]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    L = model.latent_size
    for step, users in enumerate(_batches()):
        gen = torch.Generator().manual_seed(stream_seed(7, "diffrec-t", step))
        t_u = torch.rand(GLOBAL_B, generator=gen, dtype=torch.float64)
        gen = torch.Generator().manual_seed(stream_seed(7, "ldiffrec-latent", step))
        eps, z_eps = torch.randn(GLOBAL_B, L, generator=gen), torch.randn(GLOBAL_B, L, generator=gen)
        keep = torch.rand(GLOBAL_B, L, generator=gen) >= cfg.dropout
        x_keep = column_noise(7, "ldiffrec-xdrop", step, GLOBAL_B, 0, N_ITEMS, "uniform") >= cfg.ae_dropout
        noise = {"t_u": t_u, "eps": eps, "z_eps": z_eps, "drop_mask": keep, "x_drop_mask": x_keep}
        opt.zero_grad()
        loss = model.loss(_x0(users, cfg), noise, epoch=0, step=step)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": torch.tensor(losses), "history": model.diffusion.Lt_history.clone(), "model": model}


@pytest.mark.parametrize("sharding,optimizer", [("row_wise", "sgd"), ("data_parallel", "adamw")])
def test_two_sharded_ranks_equal_the_dense_ldiffrec(sharding, optimizer):
    """L-DiffRec: cluster encoders and the decoder in the item table, the multinomial loss over
    a log-sum-exp across shards; 20 steps on 2 ranks against the dense LDiffRec (same noise,
    masks, weights): losses within 1e-4; SGD: every weight within 1e-5; AdamW: within 1% of
    the travel; then the scores of the sharded encode / reverse chain / decode equal the
    dense infer's on the final weights."""
    two = run_distributed(_sharded_latent, 2, sharding, optimizer)
    ref = _reference_latent(two[0], optimizer)
    assert torch.allclose(torch.as_tensor(two[0]["losses"]), ref["losses"], atol=1e-4, rtol=1e-5), \
        (two[0]["losses"], ref["losses"])
    cfg = _latent_cfg()
    final = _ldiffrec_from(two[0]["table"], two[0]["dense"], two[0]["in_width"], cfg)
    start = _ldiffrec_from(two[0]["initial"]["table"], two[0]["initial"]["dense"], two[0]["in_width"], cfg)
    ref_state, got, init = ref["model"].state_dict(), final.state_dict(), start.state_dict()
    travel = sum(float(((ref_state[k] - init[k]) ** 2).sum()) for k in ref_state if ref_state[k].is_floating_point())
    assert travel > 1e-6, "nothing trained"
    if optimizer == "sgd":
        for k, v in ref_state.items():
            if v.is_floating_point():
                assert torch.allclose(got[k], v, atol=1e-5), (k, (got[k] - v).abs().max())
    else:
        diff = sum(float(((got[k] - ref_state[k]) ** 2).sum()) for k in ref_state if ref_state[k].is_floating_point())
        assert diff ** 0.5 <= 0.01 * travel ** 0.5
    final.eval()
    with torch.no_grad():
        expected = final.infer(_x0(_batches()[0][:EVAL_USERS], cfg))
    scores = torch.as_tensor(two[0]["scores"])
    assert torch.allclose(scores, expected, atol=1e-5, rtol=1e-4), (scores - expected).abs().max()
