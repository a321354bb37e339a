"""One pass over the catalog for :func:`~recsys_dist.eval.ranking.rank_targets` without top-k.

The two-pass scheme (:mod:`~recsys_dist.eval.scoring`) reads every target's score from the
owner's score chunk before it can count, so it computes the chunks holding targets twice (or
keeps them). Here the owner of a target computes its score first with one small matmul of all
``B`` gathered queries against the ``n`` target rows it owns, ``(B, d) @ (d, n)``: the same
kernel as a chunk's ``(B, d) @ (d, w)``, which gives every element bit for bit the value the
chunk gives it (the element's dot product does not depend on the other columns). The scores
are shared by an all-reduce that is exact (zero except at the owner), and one pass over the
chunks counts, per user, the items scoring strictly above and exactly at the target score, in
one fused compare-and-count kernel (``torch.compile``) that reads each score once.

Every owner checks in the pass that the chunk reproduces its targets' scores bit for bit; a
mismatch anywhere (a matmul whose elements depend on the shape) makes every rank fall back to
the two-pass scheme, as does a catalog whose scores could overflow. So the integers are always
those of the two-pass scheme. Excluded items (the target itself, the padding row, the masked
seen set) are counted like any other and then taken out by index: their few scores are read
from the chunk in the same pass.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from recsys_dist.distributed import sum_over_ranks

#: dtypes the one pass serves (others, and top-k, take the two-pass scheme)
FAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: calls scoring at least this many (user, item) pairs on a rank count with a compiled kernel
#: (compare and count fused, each score read once); smaller ones count with eager ops
COMPILE_MIN_SCORES = 1 << 26
#: the target scores' matmul has at least this many columns (zero rows pad it), as chunks do
MIN_COLS = 64
#: how many calls took each path (for tests and benchmarks)
CALLS = {"one_pass": 0, "fallback": 0}

log = logging.getLogger("recsys_dist.eval")


def fast_path_ok(dtype: torch.dtype, topk: int) -> bool:
    """Whether the one-pass count applies: no top-k and a floating score dtype it serves."""
    return topk == 0 and dtype in FAST_DTYPES


def _counts_eager(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``s`` (B, w): items scoring strictly above ``t`` (B, 1), and exactly at it."""
    return (s > t).sum(dim=1, dtype=torch.int32), (s == t).sum(dim=1, dtype=torch.int32)


_compiled = None


def _counts(s: torch.Tensor, t: torch.Tensor, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_counts_eager`, through ``torch.compile`` when ``compiled`` (one fused loop; the
    eager ops materialise two boolean matrices and sum them, 3-4x the matmul's time on CPU).
    Counts eagerly, once and for good, if compilation fails (the eager ops are exact too)."""
    global _compiled
    if compiled and _compiled is not False:
        try:
            if _compiled is None:
                _compiled = torch.compile(_counts_eager, dynamic=True)
            return _compiled(s, t)
        except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler on this machine
            log.warning("torch.compile of the evaluator's counts failed (%s: %s); counting eagerly",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _compiled = False
    return _counts_eager(s, t)


_buffer: torch.Tensor | None = None


def release_score_buffer() -> None:
    """Free the score buffer kept between calls (the evaluator calls this when an evaluation
    ends, so training does not hold B x item_chunk scores)."""
    global _buffer
    _buffer = None


def _score_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) view of one score buffer kept across the calls of an evaluation: a fresh
    (B, item_chunk) output per call pays for its first touch (page faults), as much as a chunk's
    matmul at 1M items. No tensor returned to a caller is a view of it."""
    global _buffer
    need = rows * cols
    if _buffer is None or _buffer.dtype != dtype or _buffer.device != device or _buffer.numel() < need:
        _buffer = None  # free the old one first
        _buffer = torch.empty(need, dtype=dtype, device=device)
    return _buffer[:need].view(rows, cols)


def _excluded_pairs(t_all: torch.Tensor, h_all: torch.Tensor | None, lo: int, n_local: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique (user, local row) pairs on this rank counted by the pass but not candidates: each
    user's target, the padding row (global 0), and with ``h_all`` the seen ids."""
    total, device = t_all.shape[0], t_all.device
    every = torch.arange(total, device=device)
    pos = t_all - lo
    own = (pos >= 0) & (pos < n_local)
    users, rows = [every[own]], [pos[own]]
    if lo == 0 and n_local > 0:
        users.append(every)
        rows.append(torch.zeros(total, dtype=torch.long, device=device))
    if h_all is not None and h_all.numel():
        keep = (h_all > 0) & (h_all >= lo) & (h_all < lo + n_local) & (h_all != t_all[:, None])
        users.append(every[:, None].expand_as(h_all)[keep])
        rows.append(h_all[keep] - lo)
    width = max(n_local, 1)
    key = torch.unique(torch.cat(users) * width + torch.cat(rows))  # sorted: by user, then row
    return torch.div(key, width, rounding_mode="floor"), key % width


def owner_scores(q_all: torch.Tensor, rows: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
    """(n,) score of ``users[i]``'s query against ``rows[i]`` (n, d), computed as a chunk
    computes it: one ``(B, d) @ (d, >= MIN_COLS)`` matmul of every gathered query (a narrower
    product may take another kernel, e.g. gemv), read at ``(users[i], i)``."""
    n = rows.shape[0]
    if n < MIN_COLS:
        rows = torch.cat([rows, rows.new_zeros(MIN_COLS - n, rows.shape[1])])
    return (q_all @ rows.T)[users, torch.arange(n, device=rows.device)]


@torch.no_grad()
def count_one_pass(q_all: torch.Tensor, t_all: torch.Tensor, h_all: torch.Tensor | None,
                   item_block: torch.Tensor, row_offset: int, item_chunk: int,
                   group: dist.ProcessGroup | None, world: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(greater, equal, t_scores)`` for all ``B`` gathered users, reduced over the ranks:
    candidates scoring strictly above / exactly at the target's score, and that score; or None,
    on every rank, when the two-pass scheme must run instead (module docstring). Collective."""
    dtype, device = q_all.dtype, item_block.device
    total = q_all.shape[0]
    n_local, lo = int(item_block.shape[0]), int(row_offset)

    # ---- the target scores, from their owners: (B, d) @ (d, n_own), as a chunk computes them
    pos = t_all - lo
    own = ((pos >= 0) & (pos < n_local)).nonzero().squeeze(1)
    t_local = torch.zeros(total, dtype=dtype, device=device)
    if own.numel():
        t_local[own] = owner_scores(q_all, item_block[pos[own]].to(dtype), own)
    bound = float(q_all.float().norm(dim=1).max()) if total else 0.0
    if n_local:  # float32 accumulation for half-precision blocks, without a float32 copy of the block
        wide = torch.float32 if item_block.dtype in (torch.float16, torch.bfloat16) else None
        bound *= float(torch.linalg.vector_norm(item_block, dim=1, dtype=wide).max())
    else:
        bound = 0.0
    overflow = bound >= float(torch.finfo(dtype).max) / 4  # |score| <= |q| |e|
    shared = torch.cat([t_local.double(), torch.tensor([float(overflow)], dtype=torch.float64, device=device)])
    if world > 1:
        shared = sum_over_ranks(shared, group)  # zero except at each target's owner: exact
    if float(shared[-1]) > 0:
        return None
    t_scores = shared[:total].to(dtype)  # float64 holds every value of these dtypes exactly
    t_col = t_scores[:, None]

    # ---- the pass: count above / at the target score; read the excluded items' scores ------
    greater = torch.zeros(total, dtype=torch.long, device=device)
    equal = torch.zeros(total, dtype=torch.long, device=device)
    x_user, x_row = _excluded_pairs(t_all, None if h_all is None else h_all, lo, n_local)
    x_score = torch.empty(x_user.shape[0], dtype=dtype, device=device)
    order = torch.argsort(x_row)
    x_sorted = x_row[order]
    compiled = total * n_local >= COMPILE_MIN_SCORES
    buf = _score_buffer(total, min(item_chunk, max(n_local, 1)), dtype, device)
    for c0 in range(0, n_local, item_chunk):
        c1 = min(c0 + item_chunk, n_local)
        s = torch.mm(q_all, item_block[c0:c1].to(dtype).T, out=buf[:, :c1 - c0])
        above, at = _counts(s, t_col, compiled)
        greater += above
        equal += at
        a, b = torch.searchsorted(x_sorted, torch.tensor([c0, c1], device=device)).tolist()
        if b > a:
            idx = order[a:b]
            x_score[idx] = s[x_user[idx], x_row[idx] - c0]

    # ---- take the excluded items out; the owners' check that the chunks reproduced t -------
    is_target = x_row == pos[x_user]
    mismatch = int((x_score[is_target] != t_scores[x_user[is_target]]).sum())
    greater -= torch.bincount(x_user[x_score > t_scores[x_user]], minlength=total)
    equal -= torch.bincount(x_user[x_score == t_scores[x_user]], minlength=total)
    packed = torch.cat([greater, equal, torch.tensor([mismatch], dtype=torch.long, device=device)])
    if world > 1:
        packed = sum_over_ranks(packed, group)
    if int(packed[-1]) > 0:
        log.warning("rank_targets: a score chunk did not reproduce %d target scores of the small "
                    "matmul; counting in two passes", int(packed[-1]))
        return None
    return packed[:total], packed[total:2 * total], t_scores
