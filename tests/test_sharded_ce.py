"""The full-catalog CE across shards equals F.cross_entropy on the gathered logits, value and
gradients (queries and item rows), on 1 and 2 real gloo processes."""

import pytest
import torch
import torch.nn.functional as F

from distributed_harness import run_distributed

N_ROWS, DIM, B = 23, 8, 5  # 23 rows (row 0 = padding): blocks of 12 and 11 on 2 ranks


def _data():
    g = torch.Generator().manual_seed(7)
    table = torch.randn(N_ROWS, DIM, generator=g, dtype=torch.float64)
    queries = torch.randn(2 * B, DIM, generator=g, dtype=torch.float64)
    targets = torch.randint(1, N_ROWS, (2 * B,), generator=g)
    return table, queries, targets


def _worker():
    from recsys_dist.distributed import row_range
    from recsys_dist.distributed import init_distributed
    from recsys_dist.train.losses import sharded_softmax_ce

    rank, world = init_distributed(torch.device("cpu"))
    table, queries, targets = _data()
    b = 2 * B // world
    q = queries[rank * b:(rank + 1) * b].clone().requires_grad_()
    t = targets[rank * b:(rank + 1) * b]
    lo, hi = row_range(N_ROWS, world, rank)
    lo = max(lo, 1)
    table = table.clone().requires_grad_()
    block = table[lo:hi]
    target_logits = (q * table[t]).sum(-1)
    loss = sharded_softmax_ce(q, target_logits, block)
    (loss / world).backward()  # every rank's mean; /world turns the sum into the global mean
    return {"loss": loss.detach(), "q_grad": q.grad, "table_grad": table.grad, "lo": lo, "hi": hi}


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_ce_matches_cross_entropy(world):
    table, queries, targets = _data()
    table = table.clone().requires_grad_()
    q = queries.clone().requires_grad_()
    logits = q @ table[1:].t()  # padding is never a candidate
    ref = F.cross_entropy(logits, targets - 1)
    ref.backward()
    out = run_distributed(_worker, world)
    b = 2 * B // world
    losses = torch.tensor([float(o["loss"]) for o in out], dtype=torch.float64)
    assert torch.allclose(losses.mean(), ref.detach(), atol=1e-12, rtol=0)
    q_grad = torch.cat([torch.as_tensor(o["q_grad"]) for o in out])
    assert torch.allclose(q_grad, q.grad, atol=1e-12, rtol=0)
    # each rank's table gradient covers the rows it owns plus the target rows its queries use;
    # summed over ranks (what the sharded backward delivers) it equals the reference
    table_grad = sum(torch.as_tensor(o["table_grad"]) for o in out)
    assert torch.allclose(table_grad, table.grad, atol=1e-12, rtol=0)
    assert table_grad[0].abs().max() == 0  # padding row untouched
    assert out[0]["hi"] - out[0]["lo"] < N_ROWS - 1 or world == 1
    assert b * world == 2 * B


def test_sampled_softmax_with_every_item_equals_full_ce():
    from recsys_dist.train.losses import sampled_softmax_ce

    table, queries, targets = _data()
    ids = torch.arange(1, N_ROWS)  # every item: the target shows up once and is removed as a hit
    target_logits = (queries * table[targets]).sum(-1)
    got = sampled_softmax_ce(queries, target_logits, targets, table[ids], ids)
    ref = F.cross_entropy(queries @ table[1:].t(), targets - 1)
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    # logQ correction subtracts log Q from the negatives' logits only
    const = sampled_softmax_ce(queries, target_logits, targets, table[ids], ids,
                               torch.full((N_ROWS - 1,), -3.0, dtype=torch.float64))
    shifted = F.cross_entropy(torch.cat([target_logits[:, None], queries @ table[ids].t() + 3.0], 1)
                              .masked_fill(torch.cat([torch.zeros(2 * B, 1, dtype=torch.bool), ids[None] == targets[:, None]], 1), float("-inf")),
                              torch.zeros(2 * B, dtype=torch.long))
    assert torch.allclose(const, shifted, atol=1e-12, rtol=0)
