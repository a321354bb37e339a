"""Exact full-catalog ranking of held-out targets against a row-wise sharded item table.

Every rank holds a contiguous block of item rows (see :func:`~recsys_dist.distributed.
row_partition`) and a batch of its own users. :func:`rank_targets` is collective: all ranks of
``group`` call it once per evaluation step, and together they rank every user's target against
*every* catalog item (no sampling), exactly.

Algorithm (per call):

1. All-gather one small header per rank (batch size, history length, embedding width, dtype,
   owned rows, ...) so that inputs are validated collectively - a bad input on one rank raises
   the same ``ValueError`` on every rank instead of leaving the others hanging - and so that
   variable batch sizes can be padded to a common size for the next all-gathers.
2. All-gather the queries ``(B, d)``, targets ``(B,)`` and (with ``mask_history``) seen sets
   ``(B, L)`` of all ranks (``histories``: whatever the caller masks, normally every item the
   user interacted with before the target, not only the model's input window), ``B = sum_r b_r``, trimming the padding afterwards. Gathered users
   are ordered by rank, then by position in the rank's batch.
3. Each rank scores its block against all ``B`` queries, ``item_chunk`` rows at a time
   (``scores = Q_all @ chunk^T``, so peak memory is ``O(B * item_chunk)`` however many items
   there are). The target score of a user is read from the score matrix of the rank (and
   chunk) that owns the target row, and shared with all ranks by an ``all_reduce(SUM)`` of a
   ``(B,)`` tensor that is zero except at the owner - exact, because ``x + 0 == x``. It is
   never recomputed with a separate dot product, so the threshold every rank compares with
   is bit-for-bit the value the owner compares its own items with.
4. Each rank counts, per user, its candidate items whose score is *strictly greater* than the
   target score and those whose score is *equal*; an ``all_reduce(SUM)`` of these integer
   counts gives the exact position of the target up to the order of ties.
5. Optionally each rank also computes a per-user top-k over its candidates; the per-rank lists
   are all-gathered and merged into the global top-k of every user.

Candidates: every row except row 0 (padding) and the target itself; with ``mask_history`` the
rows in the user's history are removed as well, *except the target*, which is never masked
even if it occurs in the history (for ranks this is moot because the target is excluded from
its own count anyway; for top-k lists it means the target may appear in the list).

Tie rule (``ties``, see :mod:`~recsys_dist.eval.metrics`): by default ``"expected"``, HR and
NDCG averaged exactly over a uniformly random order of the items tied with the target, so a
model whose scores collapsed to a constant scores like a random ranker; ``"optimistic"`` (the
target wins every tie) and ``"pessimistic"`` are selectable. argsort-based evaluators get some
tie order by accident of the sort implementation; here the rule is explicit and independent of
world size, chunking and item order. Top-k lists order by score descending, then by item id
ascending.

Non-finite inputs are refused: a NaN or inf in any rank's queries or item rows, or a score
that overflows, raises on every rank (a NaN compares false with everything and would otherwise
rank first).

Why two passes over the chunks: a chunk's comparisons need the target scores of *all* users,
but those target scores live in chunks (possibly on other ranks) that are computed later. The
first pass computes only the chunks that contain at least one target owned by this rank and
extracts the target scores; after the all-reduce, the second pass counts. Score matrices of the
first pass are kept (up to ``score_cache_bytes``) and reused by the second pass; when the
cache is full, a chunk is recomputed with the very same operands and its target scores are
checked bit-for-bit against the shared values (a mismatch, i.e. a non-deterministic matmul,
raises on every rank).

Popularity baseline: the same machinery ranks items by a per-item count with ``d = 1``::

    lo, hi = row_partition(num_rows, world)[rank]
    block = popularity_block(counts, lo, hi)          # (hi - lo, 1) float32, counts as scores
    queries = torch.ones(b, 1)                         # every user gets score_j = counts[j]
    res = rank_targets(queries, targets, block, lo, num_rows, histories, mask_history=True)

Counts must be exactly representable in the score dtype (``< 2**24`` for float32; use
``dtype=torch.float64`` for both the block and the queries beyond that).

Devices: all tensors passed to one call must live on the same device, and that device must be
usable by the backend of ``group`` (CPU tensors for gloo, CUDA tensors for NCCL; the trainer's
``cpu:gloo,cuda:nccl`` groups take both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from recsys_dist.eval.metrics import (
    TIE_RULES,
    TieCounts,
    check_ks,
    check_ties,
    metric_sums_from_histogram,
    metrics_from_histogram,
    positions_summary,
)
from recsys_dist.distributed import gather_rows, rank_and_world, stack_over_ranks

__all__ = ["RankResult", "rank_targets", "popularity_block", "DEFAULT_SCORE_CACHE_BYTES"]

#: Default budget (bytes) for keeping first-pass score chunks around for the second pass.
DEFAULT_SCORE_CACHE_BYTES: int = 512 * 1024 * 1024

_FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
)

# Layout of the per-rank header gathered at the start of every call.
_H_OK, _H_B, _H_L, _H_D, _H_DTYPE, _H_LO, _H_NROWS_LOCAL = 0, 1, 2, 3, 4, 5, 6
_H_NUM_ROWS, _H_TOPK, _H_MASK, _H_MAXK, _H_TIES, _H_KINDS = 7, 8, 9, 10, 11, 12
_HEADER_LEN = 13

# Bits of the header's problem-kind field, so that every rank can say what went wrong where.
_KIND_NAMES: tuple[str, ...] = ("NaN/inf queries", "NaN/inf item rows", "other (see that rank's log)")


@dataclass
class RankResult:
    """Outcome of one :func:`rank_targets` call, as seen by one rank.

    Attributes:
        ranks: ``(b_r,)`` ``torch.long``, the number of candidates scoring strictly higher
            than each own user's target (its best possible 0-based position), in input order.
        ties_count: ``(b_r,)`` ``torch.long``, the number of candidates scoring exactly the
            target's score.
        target_scores: ``(b_r,)`` target scores (dot products in the query dtype), as computed
            by the owner of the target row.
        ks: metric cutoffs.
        ties: the tie rule the metrics use.
        local_rank_hist: ``(max(ks),)`` ``torch.long`` histogram of this rank's own users
            with a single position under ``ties`` (see
            :func:`~recsys_dist.eval.metrics.positions_summary`).
        local_tied: the other own users (expected rule) per ``(g, e)``.
        num_local_users: ``b_r``.
        num_users: users of this call summed over all ranks (each counted once).
        metrics: ``{"HR@K": mean, "NDCG@K": mean, ..., "num_users": N}`` over all users of
            this call on all ranks (identical on every rank; ``nan`` means when ``N == 0``).
        topk_ids: ``(b_r, topk)`` ``torch.long`` global item ids of each own user's best
            candidates (score descending, then id ascending), or ``None`` when ``topk == 0``.
            Slots beyond the number of candidates hold ``-1``.
        topk_scores: ``(b_r, topk)`` matching scores (``-inf`` in empty slots), or ``None``.
    """

    ranks: torch.Tensor
    ties_count: torch.Tensor
    target_scores: torch.Tensor
    ks: tuple[int, ...]
    ties: str
    local_rank_hist: torch.Tensor
    local_tied: TieCounts
    num_local_users: int
    num_users: int
    metrics: dict[str, float] = field(default_factory=dict)
    topk_ids: torch.Tensor | None = None
    topk_scores: torch.Tensor | None = None

    def local_sums(self) -> dict[str, float]:
        """Sums (not means) of HR@K / NDCG@K over this rank's own users, plus ``"num_users"``."""
        out = metric_sums_from_histogram(self.local_rank_hist, self.ks, self.local_tied)
        out["num_users"] = self.num_local_users
        return out


def popularity_block(
    counts: torch.Tensor, lo: int, hi: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Item block for the popularity baseline: ``counts[lo:hi, None]`` as ``dtype``.

    Args:
        counts: ``(num_rows,)`` interaction counts per item (any numeric dtype); ``counts[0]``
            (padding) is ignored by the evaluator.
        lo, hi: this rank's half-open row range (from
            :func:`~recsys_dist.distributed.row_partition`).
        dtype: score dtype; counts must be exactly representable in it (``< 2**24`` for
            float32).

    Returns:
        ``(hi - lo, 1)`` tensor. Ranking with ``queries = torch.ones(b, 1, dtype=dtype)`` then
        scores every item by its count (see the module docstring).
    """
    return counts[lo:hi].reshape(-1, 1).to(dtype)


# --------------------------------------------------------------------------------------------
# collectives
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# per-chunk helpers
# --------------------------------------------------------------------------------------------


def _scores(
    queries: torch.Tensor, item_block: torch.Tensor, c0: int, c1: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(B, c1 - c0)`` scores of all gathered queries against local rows ``c0 .. c1 - 1``.

    Always called with the same operands for a given chunk, so a recomputation reproduces the
    first computation (checked by the caller).
    """
    return queries @ item_block[c0:c1].to(dtype).T


def _positions_mask(ids: torch.Tensor, first_id: int, width: int) -> torch.Tensor:
    """``(B, width)`` bool: ``out[i, j]`` is True iff ``first_id + j`` occurs in ``ids[i]``.

    Args:
        ids: ``(B, L)`` global item ids (any values; those outside the window are ignored).
        first_id: global id of column 0.
        width: number of columns.
    """
    inside = (ids >= first_id) & (ids < first_id + width)
    # Ids outside the window are routed to a dummy column ``width`` that is dropped after.
    idx = torch.where(inside, ids - first_id, torch.full_like(ids, width))
    out = torch.zeros(ids.shape[0], width + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(1, idx, True)
    return out[:, :width]


def _topk_in_chunk(
    scores: torch.Tensor, first_id: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-``k`` of a chunk whose column ``j`` is item ``first_id + j``.

    Masked candidates must already be ``-inf``. Selection is exact under the order "score
    descending, then id ascending": all entries above the k-th largest value are taken, and
    among entries equal to it the lowest ids (leftmost columns) fill the remaining slots.

    Returns:
        ``(B, k)`` scores and ``(B, k)`` ``torch.long`` ids, unsorted; ids are ``-1`` where the
        score is ``-inf`` (no candidate), including padding slots when the chunk has fewer than
        ``k`` columns.
    """
    n_q, width = scores.shape
    kk = min(k, width)
    vals = torch.full((n_q, k), float("-inf"), dtype=scores.dtype, device=scores.device)
    ids = torch.full((n_q, k), -1, dtype=torch.long, device=scores.device)
    if kk == 0 or n_q == 0:
        return vals, ids
    kth = torch.topk(scores, kk, dim=1, largest=True, sorted=True).values[:, kk - 1 :]
    above = scores > kth
    tied = scores == kth
    need = kk - above.sum(dim=1, keepdim=True)
    take = above | (tied & (torch.cumsum(tied, dim=1, dtype=torch.int32) <= need))
    cols = take.nonzero()[:, 1]
    if cols.numel() != n_q * kk:
        raise ValueError("top-k selection failed: scores contain NaN")
    cols = cols.view(n_q, kk)  # nonzero() is row-major, so each row's columns are contiguous
    chosen = scores.gather(1, cols)
    vals[:, :kk] = chosen
    ids[:, :kk] = torch.where(torch.isneginf(chosen), torch.full_like(cols, -1), cols + first_id)
    return vals, ids


def _merge_topk(
    vals: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of ``(B, m)`` candidate lists, ordered by score desc, then id asc.

    Two stable sorts: by id ascending, then by score descending (stability keeps the id order
    inside every group of equal scores). Entries with id ``-1`` are empty slots (score
    ``-inf``) and sort last.
    """
    ids_sorted, order = torch.sort(ids, dim=1, stable=True)
    vals_sorted = vals.gather(1, order)
    vals_final, order = torch.sort(vals_sorted, dim=1, descending=True, stable=True)
    ids_final = ids_sorted.gather(1, order)
    return vals_final[:, :k], ids_final[:, :k]


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _local_problems(
    queries: torch.Tensor,
    targets: torch.Tensor,
    item_block: torch.Tensor,
    row_offset: int,
    num_rows: int,
    histories: torch.Tensor | None,
    mask_history: bool,
    topk: int,
    item_chunk: int,
) -> list[str]:
    """Everything wrong with this rank's inputs (empty list when fine)."""
    problems: list[str] = []
    if item_block.dim() != 2:
        problems.append(f"item_block must be 2-D (n_r, d), got shape {tuple(item_block.shape)}")
        return problems
    n_r, d = item_block.shape
    if queries.dim() != 2 or queries.shape[1] != d:
        problems.append(f"queries must be (b_r, {d}), got shape {tuple(queries.shape)}")
    if queries.dtype not in _FLOAT_DTYPES:
        problems.append(f"queries must be floating point, got {queries.dtype}")
    elif queries.numel() and not bool(torch.isfinite(queries).all()):
        bad = int((~torch.isfinite(queries)).any(dim=-1).sum()) if queries.dim() == 2 else -1
        problems.append(f"queries hold NaN/inf values ({bad} of {queries.shape[0]} users)")
    if item_block.dtype in _FLOAT_DTYPES and item_block.numel() and not bool(torch.isfinite(item_block).all()):
        bad = int((~torch.isfinite(item_block)).any(dim=-1).sum())
        problems.append(f"item rows hold NaN/inf values ({bad} rows from global id {row_offset})")
    if targets.dim() != 1 or (queries.dim() == 2 and targets.shape[0] != queries.shape[0]):
        problems.append(
            f"targets must be (b_r,) matching queries {tuple(queries.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        problems.append(f"targets must be integer ids, got {targets.dtype}")
    elif targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= num_rows):
        problems.append(f"targets must lie in [1, {num_rows}) (row 0 is padding)")
    if not 0 <= row_offset <= num_rows or row_offset + n_r > num_rows:
        problems.append(f"rows [{row_offset}, {row_offset + n_r}) exceed num_rows={num_rows}")
    if mask_history and histories is not None:
        if histories.dim() != 2 or histories.shape[0] != targets.shape[0]:
            problems.append(
                f"histories must be (b_r, L) with b_r = {targets.shape[0]}, "
                f"got {tuple(histories.shape)}"
            )
        elif histories.dtype.is_floating_point or histories.dtype == torch.bool:
            problems.append(f"histories must be integer ids, got {histories.dtype}")
        elif histories.numel() and (int(histories.min()) < 0 or int(histories.max()) >= num_rows):
            problems.append(f"history ids must lie in [0, {num_rows}) (0 = padding)")
    if mask_history and histories is None and targets.numel() > 0:
        problems.append("mask_history=True needs histories")
    if topk < 0:
        problems.append(f"topk must be >= 0, got {topk}")
    if item_chunk < 1:
        problems.append(f"item_chunk must be >= 1, got {item_chunk}")
    devices = {t.device for t in (queries, targets, item_block)}
    if mask_history and histories is not None:
        devices.add(histories.device)
    if len(devices) > 1:
        problems.append(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return problems


def _problem_kinds(problems: list[str]) -> int:
    """Bit mask over :data:`_KIND_NAMES` of this rank's problems."""
    bits = 0
    for p in problems:
        if p.startswith("queries hold NaN/inf"):
            bits |= 1
        elif p.startswith("item rows hold NaN/inf"):
            bits |= 2
        else:
            bits |= 4
    return bits


def _begin_call(ks: Sequence[int], ties: str, group: dist.ProcessGroup | None
                ) -> tuple[tuple[int, ...], str, int, int, int]:
    """The checks every collective ranking call starts with: ``(ks, ties, max(ks), rank, world)``."""
    ks = check_ks(ks)
    ties = check_ties(ties)
    rank, world = rank_and_world(group)
    if world > 1 and group is not None and rank < 0:
        raise ValueError("this process is not a member of `group`")
    return ks, ties, max(ks, default=0), rank, world


def _exchange_headers(header: torch.Tensor, problems: list[str], world: int, group: dist.ProcessGroup | None,
                      num_rows: int, who: str) -> torch.Tensor:
    """All-gather every rank's header (CPU ``(world, len)`` result) and raise the same
    ``ValueError`` on every rank if any rank's inputs are invalid (naming the ranks and the kind
    of problem) or the ranks disagree (:func:`_check_headers`)."""
    if world > 1:
        headers = stack_over_ranks(header, group).cpu()
    else:
        headers = header.cpu().unsqueeze(0)
    bad_ranks = [r for r in range(world) if headers[r, _H_OK] == 0]
    if bad_ranks:
        kinds = "; ".join(
            f"rank {r}: " + ", ".join(n for i, n in enumerate(_KIND_NAMES) if int(headers[r, _H_KINDS]) >> i & 1)
            for r in bad_ranks
        )
        mine = ("; this rank: " + "; ".join(problems)) if problems else ""
        raise ValueError(f"{who}: invalid inputs on rank(s) {bad_ranks} ({kinds}){mine}")
    problems = _check_headers(headers, num_rows)
    if problems:
        raise ValueError(f"{who}: " + "; ".join(problems))
    return headers


def _check_headers(headers: torch.Tensor, num_rows: int) -> list[str]:
    """Cross-rank consistency problems in the gathered ``(world, _HEADER_LEN)`` headers."""
    problems: list[str] = []
    for col, what in (
        (_H_D, "embedding width d"),
        (_H_DTYPE, "query dtype"),
        (_H_NUM_ROWS, "num_rows"),
        (_H_TOPK, "topk"),
        (_H_MASK, "mask_history"),
        (_H_MAXK, "max(ks)"),
        (_H_TIES, "tie rule"),
    ):
        values = headers[:, col].tolist()
        if len(set(values)) > 1:
            if col == _H_DTYPE:
                values = [
                    str(_FLOAT_DTYPES[v]) if 0 <= v < len(_FLOAT_DTYPES) else "?" for v in values
                ]
            problems.append(f"ranks disagree on {what}: {values}")
    # The row blocks must tile [0, num_rows) exactly, or some items would be scored twice or
    # never.
    blocks = sorted(
        (int(lo), int(lo + n)) for lo, n in headers[:, [_H_LO, _H_NROWS_LOCAL]].tolist() if n > 0
    )
    expected = 0
    for lo, hi in blocks:
        if lo != expected:
            break
        expected = hi
    if expected != num_rows or any(lo < 0 for lo, _ in blocks):
        problems.append(
            "item blocks [row_offset, row_offset + n_r) of the ranks do not tile "
            f"[0, {num_rows}): {blocks}"
        )
    return problems


# --------------------------------------------------------------------------------------------
# the collective
# --------------------------------------------------------------------------------------------


def rank_targets(
    queries: torch.Tensor,
    targets: torch.Tensor,
    item_block: torch.Tensor,
    row_offset: int,
    num_rows: int,
    histories: torch.Tensor | None = None,
    mask_history: bool = False,
    ks: Sequence[int] = (5, 10, 20, 50),
    topk: int = 0,
    group: dist.ProcessGroup | None = None,
    item_chunk: int = 65536,
    score_cache_bytes: int = DEFAULT_SCORE_CACHE_BYTES,
    ties: str = "expected",
) -> RankResult:
    """Exact rank of every user's target among all catalog items (collective over ``group``).

    Every rank of ``group`` must call this the same number of times with consistent
    ``num_rows``, ``ks``, ``topk``, ``mask_history``, embedding width and query dtype. A rank
    without (more) users passes ``b_r = 0`` (``queries`` of shape ``(0, d)``, ``targets`` of
    shape ``(0,)``) and still takes part; loop ``max_over_ranks(n_local_batches)`` times (see
    :func:`~recsys_dist.distributed.max_over_ranks`). Without an initialised process group
    (or with a group of one rank) it runs single-process, without any communication.

    Args:
        queries: ``(b_r, d)`` floating query vectors of this rank's users (``b_r`` may differ
            between ranks and may be 0). Scores are computed in this dtype (the item block is
            cast to it chunk by chunk).
        targets: ``(b_r,)`` integer global item ids of the held-out targets, in
            ``[1, num_rows)``.
        item_block: ``(n_r, d)`` this rank's item rows, global ids
            ``row_offset .. row_offset + n_r - 1`` (``n_r`` may be 0). The blocks of all ranks
            must tile ``[0, num_rows)``, e.g. as given by
            :func:`~recsys_dist.distributed.row_partition`.
        row_offset: global id of ``item_block[0]``.
        num_rows: catalog size in rows, padding row 0 included.
        histories: ``(b_r, L)`` integer item ids per user to mask, ``0`` = padding; only read
            when ``mask_history`` (``L`` may differ between ranks). Pass the user's whole seen
            set (the trainer passes the shards' ``seen`` column), not the truncated input window.
        mask_history: remove the items of ``histories`` from each user's candidates (never the
            target itself).
        ks: metric cutoffs ``K`` for HR@K / NDCG@K.
        topk: if ``> 0``, also return each own user's ``topk`` best candidates (the target is a
            candidate here; padding and masked history are not).
        group: process group; ``None`` = default group (or no distribution at all).
        item_chunk: rows scored per matmul; peak extra memory is about
            ``B * item_chunk * (element size + a few bytes)`` where ``B = sum_r b_r``.
        score_cache_bytes: bytes of first-pass score chunks that may be kept for the second
            pass instead of being recomputed (see the module docstring).
        ties: ``"expected"`` (default) | ``"optimistic"`` | ``"pessimistic"``: how candidates
            scoring exactly the target's score enter HR/NDCG (module docstring).

    Returns:
        A :class:`RankResult` for this rank's own users: ``ranks`` = number of candidates ``j``
        with ``score_j > score_target``, ``ties_count`` = number with ``score_j ==
        score_target``, where candidates are all rows except row 0, the target, and - with
        ``mask_history`` - the ids in ``histories``. HR@K = ``1[r < K]``, NDCG@K =
        ``1 / log2(r + 2)`` if ``r < K`` else 0 for the target's position ``r``, averaged over
        the tie positions under the expected rule.

    Raises:
        ValueError: on every rank, if any rank passed invalid or inconsistent inputs
            (including NaN/inf queries or item rows).
        RuntimeError: on every rank, if recomputing a score chunk did not reproduce the target
            scores bit-for-bit (non-deterministic matmul; raise ``score_cache_bytes``).
    """
    ks, ties, max_k, rank, world = _begin_call(ks, ties, group)
    device = item_block.device

    # ---- normalise shapes of an empty batch (b_r = 0) -------------------------------------
    d = item_block.shape[-1] if item_block.dim() == 2 else -1
    if queries.numel() == 0 and targets.numel() == 0 and d >= 0:
        queries = queries.reshape(0, d)
        targets = targets.reshape(0)
        if histories is not None and histories.numel() == 0:
            histories = histories.reshape(0, histories.shape[-1] if histories.dim() == 2 else 0)
    if not mask_history:
        histories = None
    elif histories is None and targets.numel() == 0:
        histories = torch.zeros(0, 0, dtype=torch.long, device=device)

    problems = _local_problems(
        queries, targets, item_block, row_offset, num_rows, histories, mask_history, topk,
        item_chunk,
    )
    b = int(targets.shape[0]) if targets.dim() == 1 else 0
    n_local = int(item_block.shape[0]) if item_block.dim() == 2 else 0
    hist_len = int(histories.shape[1]) if histories is not None and histories.dim() == 2 else 0
    dtype_code = _FLOAT_DTYPES.index(queries.dtype) if queries.dtype in _FLOAT_DTYPES else -1

    # ---- 1. headers: validate collectively, learn the batch sizes -------------------------
    header = torch.tensor(
        [
            0 if problems else 1, b, hist_len, d, dtype_code, row_offset, n_local, num_rows,
            topk, int(mask_history), max_k, TIE_RULES.index(ties), _problem_kinds(problems),
        ],
        dtype=torch.long,
        device=device,
    )
    headers = _exchange_headers(header, problems, world, group, num_rows, "rank_targets")

    sizes = [int(s) for s in headers[:, _H_B].tolist()]
    total = sum(sizes)
    first_user = sum(sizes[:rank])
    dtype = queries.dtype
    empty_long = torch.zeros(0, dtype=torch.long, device=device)

    if total == 0:  # nobody has users: identical decision on every rank, no more collectives
        zeros_hist = torch.zeros(max_k, dtype=torch.long)
        return RankResult(
            ranks=empty_long,
            ties_count=empty_long,
            target_scores=torch.zeros(0, dtype=dtype, device=device),
            ks=ks,
            ties=ties,
            local_rank_hist=zeros_hist,
            local_tied={},
            num_local_users=0,
            num_users=0,
            metrics=metrics_from_histogram(zeros_hist, 0, ks),
            topk_ids=torch.zeros(0, topk, dtype=torch.long, device=device) if topk else None,
            topk_scores=torch.zeros(0, topk, dtype=dtype, device=device) if topk else None,
        )

    # ---- 2. gather queries, targets (+ histories) -----------------------------------------
    queries = queries.to(device)
    targets = targets.to(device=device, dtype=torch.long)
    if histories is not None:
        l_max = int(headers[:, _H_L].max())
        padded_hist = torch.zeros(b, l_max, dtype=torch.long, device=device)
        padded_hist[:, :hist_len] = histories.to(torch.long)
        ids_local = torch.cat([targets[:, None], padded_hist], dim=1)
    else:
        ids_local = targets[:, None]
    if world > 1:
        q_all = gather_rows(queries.detach(), sizes, group)
        ids_all = gather_rows(ids_local, sizes, group)
    else:
        q_all = queries.contiguous()
        ids_all = ids_local
    t_all = ids_all[:, 0].contiguous()
    h_all = ids_all[:, 1:].contiguous() if histories is not None else None

    # ---- 3. first pass: target scores from the owner's score matrices --------------------
    lo = int(row_offset)
    chunks = [(c0, min(c0 + item_chunk, n_local)) for c0 in range(0, n_local, item_chunk)]
    local_pos = t_all - lo
    owned = (local_pos >= 0) & (local_pos < n_local)
    owned_users = owned.nonzero().squeeze(1)
    chunk_of_user = torch.div(local_pos[owned_users], item_chunk, rounding_mode="floor")
    target_chunks = sorted(set(chunk_of_user.tolist()))

    t_scores = torch.zeros(total, dtype=dtype, device=device)
    cache: dict[int, torch.Tensor] = {}
    cache_used = 0
    for ci in target_chunks:
        c0, c1 = chunks[ci]
        s = _scores(q_all, item_block, c0, c1, dtype)
        users = owned_users[chunk_of_user == ci]
        t_scores[users] = s[users, local_pos[users] - c0]
        nbytes = s.numel() * s.element_size()
        if cache_used + nbytes <= score_cache_bytes:
            cache[ci] = s
            cache_used += nbytes
    if world > 1:
        # Zero everywhere except at the owner of each target: the sum is exact.
        dist.all_reduce(t_scores, op=dist.ReduceOp.SUM, group=group)

    # ---- 4. second pass: count strictly higher candidates (+ local top-k) -----------------
    counts = torch.zeros(total, dtype=torch.long, device=device)
    equal = torch.zeros(total, dtype=torch.long, device=device)
    mismatch = torch.zeros(1, dtype=torch.long, device=device)
    nonfinite = torch.zeros(1, dtype=torch.long, device=device)
    threshold = t_scores[:, None]
    run_vals = torch.full((total, topk), float("-inf"), dtype=dtype, device=device)
    run_ids = torch.full((total, topk), -1, dtype=torch.long, device=device)
    target_col = t_all[:, None]
    for ci, (c0, c1) in enumerate(chunks):
        s = cache.pop(ci, None)
        if s is None:
            s = _scores(q_all, item_block, c0, c1, dtype)
            if ci in target_chunks:  # recomputed: must reproduce the shared target scores
                users = owned_users[chunk_of_user == ci]
                again = s[users, local_pos[users] - c0]
                mismatch += (again != t_scores[users]).sum()
        first_id = lo + c0
        width = c1 - c0
        is_target = _positions_mask(target_col, first_id, width)
        masked = torch.zeros_like(is_target)
        if h_all is not None:
            masked |= _positions_mask(h_all, first_id, width)
        if first_id == 0:
            masked[:, 0] = True  # padding row
        masked &= ~is_target  # the target is never masked ...
        excluded = masked | is_target  # ... but it never counts against itself
        counts += ((s > threshold) & ~excluded).sum(dim=1)
        equal += ((s == threshold) & ~excluded).sum(dim=1)
        nonfinite += (~torch.isfinite(s)).sum()
        if topk > 0:
            cand = s.masked_fill(masked, float("-inf"))
            vals, ids = _topk_in_chunk(cand, first_id, topk)
            run_vals, run_ids = _merge_topk(
                torch.cat([run_vals, vals], dim=1), torch.cat([run_ids, ids], dim=1), topk
            )
        del s

    packed = torch.cat([counts, equal, mismatch, nonfinite])
    if world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    if int(packed[-1]) != 0:
        raise ValueError(
            f"rank_targets: {int(packed[-1])} scores are NaN/inf (finite queries and rows whose "
            f"dot products overflow {dtype}); refusing to rank them"
        )
    if int(packed[-2]) != 0:
        raise RuntimeError(
            "rank_targets: recomputed score chunks did not reproduce the target scores "
            f"({int(packed[-2])} mismatches): the matmul is not deterministic here; raise "
            "score_cache_bytes so that the first-pass scores are reused"
        )
    all_ranks, all_equal = packed[:total], packed[total:2 * total]
    own = slice(first_user, first_user + b)
    ranks = all_ranks[own].clone()
    ties_count = all_equal[own].clone()

    # ---- 5. merge the per-rank top-k lists ------------------------------------------------
    topk_ids: torch.Tensor | None = None
    topk_scores: torch.Tensor | None = None
    if topk > 0:
        if world > 1:
            g_vals = stack_over_ranks(run_vals, group)[:, own]
            g_ids = stack_over_ranks(run_ids, group)[:, own]
            # (world, b, k) -> (b, world * k)
            g_vals = g_vals.permute(1, 0, 2).reshape(b, world * topk)
            g_ids = g_ids.permute(1, 0, 2).reshape(b, world * topk)
            topk_scores, topk_ids = _merge_topk(g_vals, g_ids, topk)
        else:
            topk_scores, topk_ids = run_vals[own], run_ids[own]
        topk_ids = topk_ids.contiguous()
        topk_scores = topk_scores.contiguous()

    # Every rank holds the ranks of *all* users after the all-reduce, so the global histogram
    # needs no further communication; each user appears exactly once in it.
    global_hist, global_tied = positions_summary(all_ranks, all_equal, max_k, ties)
    local_hist, local_tied = positions_summary(ranks, ties_count, max_k, ties)
    return RankResult(
        ranks=ranks,
        ties_count=ties_count,
        target_scores=t_scores[own].clone(),
        ks=ks,
        ties=ties,
        local_rank_hist=local_hist,
        local_tied=local_tied,
        num_local_users=b,
        num_users=total,
        metrics=metrics_from_histogram(global_hist, total, ks, global_tied),
        topk_ids=topk_ids,
        topk_scores=topk_scores,
    )
