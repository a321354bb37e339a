"""All-position training for causal models (train.objective: all_positions).

- ``query_all`` of SASRec and GRU4Rec: its last row is ``query`` (and ``infer``), and the
  query at position i does not change when the items after i change (causality);
- the weighted losses equal per-row F.cross_entropy (float64, 1e-12);
- through ``train_step`` on 1 and 2 real gloo ranks, same global batch: at step 0 the loss
  equals a brute-force per-position F.cross_entropy over the whole table (padding excluded,
  the mean over the global batch's real positions) to 1e-6 relative, and, under plain SGD
  (scale sensitive), the table update equals -lr * the brute-force gradient to 1e-6 + 1e-5 *
  its largest entry and the dense update to 1e-6 + 1e-4 * its size (float32, both sides); the per-step
  losses and the table after STEPS steps agree between 1 and 2 ranks to 1e-5 (the tolerance
  of tests/test_sharded_training.py). The two ranks hold different numbers of real positions,
  so a per-rank mean (instead of the global one) would fail;
- the sampled softmax runs under all positions and agrees between 1 and 2 ranks (1e-5);
- a non-causal model given all_positions raises a ValueError naming it and train.objective;
- SASRec and GRU4Rec scored by cosine (``model.similarity: cosine``): the same checks against
  a brute force over unit rows with unit queries over the temperature, and its queries have
  norm 1 / temperature at every position.
"""

import types

import pytest
import torch
import torch.nn.functional as F

from distributed_harness import run_distributed
from model_checks import left_padded_batches, small_model_config
from recsys_dist.models import build_model

CAUSAL = ["sasrec", "gru4rec"]
ML, MD = 12, 16  # model tests: history length, dim


def _model(name, **kw):
    cfg = dict(name=name, dim=MD, num_heads=2, dropout=0.0, emb_dropout=0.0, diffusion_steps=8, sample_steps=4)
    cfg.update(kw)
    return build_model(small_model_config(**cfg), ML)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(5, ML, MD, generator=g)
    mask = torch.zeros(5, ML, dtype=torch.bool)
    mask[0, -1:] = True
    mask[1, -5:] = True
    mask[2] = True
    mask[3, -9:] = True  # row 4: empty history
    return hist * mask[..., None], mask, torch.randn(5, MD, generator=g)


@pytest.mark.parametrize("name", CAUSAL)
def test_query_all_last_row_is_query(name):
    model = _model(name, num_layers=2).eval()
    hist, mask, target = _inputs()
    q_all = model.query_all(hist, mask, {})
    assert q_all.shape == (5, ML, MD) and torch.isfinite(q_all).all()
    assert torch.allclose(q_all[:, -1], model.query(hist, mask, target, {}), atol=1e-6, rtol=0)
    assert torch.allclose(q_all[:, -1], model.infer(hist, mask, {}), atol=1e-6, rtol=0)
    # garbage in padded positions changes no real position's query
    poisoned = hist + (~mask)[..., None] * 100.0
    assert torch.allclose(model.query_all(poisoned, mask, {})[mask], q_all[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CAUSAL)
def test_query_all_is_causal(name):
    model = _model(name, num_layers=2).eval()
    hist, mask, _ = _inputs()
    base = model.query_all(hist, mask, {})
    g = torch.Generator().manual_seed(1)
    for i in (3, 7, 9, ML - 2):
        changed = hist.clone()
        later = mask.clone()
        later[:, :i + 1] = False  # real items after position i
        changed[later] = torch.randn(int(later.sum()), MD, generator=g)
        got = model.query_all(changed, mask, {})
        assert torch.allclose(got[:, :i + 1], base[:, :i + 1], atol=1e-6, rtol=0), i
        assert not torch.allclose(got[later], base[later], atol=1e-3), i  # the later ones do see them


def test_weighted_losses_equal_per_row_cross_entropy():
    from recsys_dist.train.losses import sampled_softmax_ce, sharded_softmax_ce

    g = torch.Generator().manual_seed(7)
    table = torch.randn(23, 8, generator=g, dtype=torch.float64)
    q = torch.randn(12, 8, generator=g, dtype=torch.float64)
    t = torch.randint(1, 23, (12,), generator=g)
    w = torch.rand(12, generator=g, dtype=torch.float64) * (torch.arange(12) % 3 > 0)  # some rows weigh 0
    per_row = F.cross_entropy(q @ table[1:].t(), t - 1, reduction="none")
    target_logits = (q * table[t]).sum(-1)
    got = sharded_softmax_ce(q, target_logits, table[1:], weights=w)
    assert torch.allclose(got, (w * per_row).sum(), atol=1e-12, rtol=0)
    assert torch.allclose(sharded_softmax_ce(q, target_logits, table[1:]), per_row.mean(), atol=1e-12, rtol=0)
    ids = torch.arange(1, 23)
    got = sampled_softmax_ce(q, target_logits, t, table[ids], ids, weights=w)
    assert torch.allclose(got, (w * per_row).sum(), atol=1e-12, rtol=0)
    # a zero-weight row contributes nothing, even a non-finite one
    bad = target_logits.clone()
    bad[0] = float("inf")
    w0 = w.clone()
    w0[0] = 0.0
    assert torch.isfinite(sharded_softmax_ce(q, bad, table[1:], weights=w0))


def test_non_causal_model_with_all_positions_raises():
    from recsys_dist.train.step import check_objective, train_step

    for name in ["diffurec", "dreamrec", "dimerec"]:
        model = _model(name)
        assert not model.supports_all_positions
        with pytest.raises(ValueError, match=rf"train\.objective.*{type(model).__name__}"):
            check_objective(model, "all_positions")
        check_objective(model, "last")
        with pytest.raises(ValueError, match=rf"train\.objective.*{type(model).__name__}"):
            train_step(types.SimpleNamespace(module=model), None, torch.ones(2, ML, dtype=torch.long),
                       torch.ones(2, dtype=torch.long), 0, 0, objective="all_positions")
    for name in CAUSAL:
        check_objective(_model(name), "all_positions")
    with pytest.raises(ValueError, match="train.objective"):
        check_objective(_model("sasrec"), "every_position")


# ----------------------------------------------------------------------- through train_step

ROWS, DIM, L, GLOBAL_B, STEPS = 301, 16, 10, 8, 4
TABLE_LR, DENSE_LR = 0.5, 0.1


def _batches():
    return left_padded_batches(11, STEPS, GLOBAL_B, ROWS, L)


def _reference(model, table0: torch.Tensor, hist: torch.Tensor, target: torch.Tensor, cosine: bool = False):
    """Brute force on the global batch: mean over real positions of F.cross_entropy over every
    item row (cosine: over the unit rows; the model's queries are already unit / T); returns
    (loss, d loss / d table, {name: d loss / d dense param})."""
    from recsys_dist.train.step import next_item_ids

    table = table0.clone().requires_grad_()
    mask = hist > 0
    emb = table[hist] * mask[..., None]
    q = model.query_all(emb, mask, {}).reshape(-1, DIM)
    ids = next_item_ids(hist, target).reshape(-1)
    valid = mask.reshape(-1)
    keys = table[1:] / table[1:].norm(dim=-1, keepdim=True) if cosine else table[1:]
    loss = F.cross_entropy(q[valid] @ keys.t(), ids[valid] - 1)  # padding never a candidate
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, [table, *params], allow_unused=True)  # leaves .grad alone
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip([table, *params], grads)]
    return loss.detach(), grads[0], dict(zip(names, grads[1:]))


COSINE = dict(similarity="cosine", temperature=0.05)  # HSTU's SASRec recipe


def _train(model_name: str, score: dict | None = None):
    from recsys_dist.config import JobConfig
    from recsys_dist.sparse import ShardedItemTable
    from recsys_dist.distributed import init_distributed, seed_everything
    from recsys_dist.train.engine import build_engine
    from recsys_dist.train.step import train_step

    device = torch.device("cpu")
    rank, world = init_distributed(device)
    cfg = JobConfig()
    cfg.model = small_model_config(model_name, dim=DIM, num_heads=2, dropout=0.0, emb_dropout=0.0, **(score or {}))
    cfg.sparse.init_block_rows = 64
    cfg.sparse.optimizer, cfg.sparse.lr = "sgd", TABLE_LR  # plain SGD: a wrong gradient scale shows
    cfg.train.optimizer, cfg.train.lr, cfg.train.grad_clip = "sgd", DENSE_LR, 0.0
    cfg.train.batch_size = GLOBAL_B // world
    seed_everything(0)
    model = build_model(cfg.model, L)
    table = ShardedItemTable.create(ROWS, DIM, cfg.sparse, device, cfg.train.batch_size, seed=5)
    engine = build_engine(model, cfg.train, device)
    b = cfg.train.batch_size
    initial = table.full_table()
    dense0 = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    out = {"initial": initial, "losses": []}
    for step, (hist, target) in enumerate(_batches()):
        if step == 0:
            out["ref_loss"], ref_table_grad, ref_dense_grad = _reference(engine.module, initial, hist, target,
                                                                         cosine=bool(score))
            q = engine.module.query_all(table.full_table()[hist] * (hist > 0)[..., None], hist > 0, {})
            out["query_norms"] = q.detach().norm(dim=-1)[hist > 0]
        loss = train_step(engine, table, hist[rank * b:(rank + 1) * b], target[rank * b:(rank + 1) * b],
                          step, seed=0, objective="all_positions")
        out["losses"].append(loss.item())
        if step == 0:
            out["table_update"] = table.full_table() - initial
            out["ref_table_update"] = -TABLE_LR * ref_table_grad
            out["dense_update"] = {k: v.detach() - dense0[k] for k, v in engine.module.named_parameters()}
            out["ref_dense_update"] = {k: -DENSE_LR * g for k, g in ref_dense_grad.items()}
    out["final"] = table.full_table()
    out["losses"] = torch.tensor(out["losses"])
    # one more step under the sampled softmax (candidates drawn for the global batch: the same
    # on any world size), in-batch negatives included
    from recsys_dist.train.catalog_loss import SampledSoftmax
    from recsys_dist.train.negatives import NegativeSampler

    hist, target = _batches()[0]
    sampler = NegativeSampler(ROWS, counts=torch.ones(ROWS), kind="uniform")
    out["sampled_loss"] = train_step(engine, table, hist[rank * b:(rank + 1) * b], target[rank * b:(rank + 1) * b],
                                     STEPS, seed=0, catalog_loss=SampledSoftmax(sampler, 64, 0, in_batch_negatives=True),
                                     objective="all_positions").item()
    return out


def _check_against_reference(run):
    ref = float(run["ref_loss"])
    assert abs(run["losses"][0] - ref) <= 1e-6 * ref  # float32: ~2 ulps apart at ~5.7 (1 ulp = 4.8e-7)
    moved = abs(run["ref_table_update"]).max()
    assert moved > 1e-4, "the table did not train"
    # float32 on both sides; relative to the largest update (cosine's 1 / T = 20 scales the logits)
    assert abs(run["table_update"] - run["ref_table_update"]).max() < 1e-6 + 1e-5 * moved
    assert (run["table_update"][0] == 0).all(), "padding row must never be updated"
    for k, ref in run["ref_dense_update"].items():
        got = run["dense_update"][k]
        assert abs(got - ref).max() <= 1e-6 + 1e-4 * abs(ref).max(), k


@pytest.mark.parametrize("model_name,score", [("sasrec", None), ("gru4rec", None), ("sasrec", COSINE),
                                              ("gru4rec", COSINE)],
                         ids=["sasrec", "gru4rec", "sasrec-cosine", "gru4rec-cosine"])
def test_two_ranks_match_one_rank_and_brute_force(model_name, score):
    hist = _batches()[0][0]
    half = GLOBAL_B // 2
    assert (hist[:half] > 0).sum() != (hist[half:] > 0).sum(), "ranks must hold unequal position counts"
    one = run_distributed(_train, 1, model_name, score)[0]
    two = run_distributed(_train, 2, model_name, score)
    if score:
        norms = torch.as_tensor(one["query_norms"])
        assert torch.allclose(norms, torch.full_like(norms, 1 / COSINE["temperature"]), rtol=1e-5, atol=0)
    _check_against_reference(one)
    for r in range(2):
        _check_against_reference(two[r])
    assert (two[0]["initial"] == one["initial"]).all()
    assert abs(two[0]["losses"] - one["losses"]).max() < 1e-5
    assert (two[0]["losses"] == two[1]["losses"]).all()
    assert abs(one["final"] - one["initial"]).max() > 1e-3, "the table did not train"
    assert abs(two[0]["final"] - one["final"]).max() < 1e-5
    assert (one["final"][0] == 0).all()
    assert 0 < one["sampled_loss"] < 20 and abs(two[0]["sampled_loss"] - one["sampled_loss"]) < 1e-5
