"""Input checks of the collective ranking calls (:func:`~recsys_dist.eval.ranking.rank_targets`,
:func:`~recsys_dist.eval.multi.rank_target_sets`).

Each call starts by all-gathering one small ``torch.long`` header per rank (batch size, id-list
width, embedding width, query dtype, owned rows, settings, whether the rank's inputs are valid).
A bad input on one rank therefore raises the *same* ``ValueError`` on every rank (naming the
ranks and the kind of problem) instead of leaving the others hanging in a collective, and the
ranks learn each other's batch sizes for the gathers that follow. The header also checks that
the ranks agree on the settings and that their item blocks tile ``[0, num_rows)`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from recsys_dist.distributed import rank_and_world, stack_over_ranks
from recsys_dist.eval.metrics import TIE_RULES, check_ks, check_ties

_FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
)

# Layout of the per-rank header gathered at the start of every call (callers may append
# columns of their own after _HEADER_LEN; the checks here read only these).
_H_OK, _H_B, _H_L, _H_D, _H_DTYPE, _H_LO, _H_NROWS_LOCAL = 0, 1, 2, 3, 4, 5, 6
_H_NUM_ROWS, _H_TOPK, _H_MASK, _H_MAXK, _H_TIES, _H_KINDS = 7, 8, 9, 10, 11, 12
_HEADER_LEN = 13

# Bits of the header's problem-kind field, so that every rank can say what went wrong where.
_KIND_NAMES: tuple[str, ...] = ("NaN/inf queries", "NaN/inf item rows", "other (see that rank's log)")


# --------------------------------------------------------------------------------------------
# this rank's inputs
# --------------------------------------------------------------------------------------------


def _empty_2d(ids: torch.Tensor | None) -> torch.Tensor | None:
    """An empty id list as ``(0, L)`` (``L`` = its last size if 2-D, else 0); ``None`` and
    non-empty lists unchanged."""
    if ids is None or ids.numel() != 0:
        return ids
    return ids.reshape(0, ids.shape[-1] if ids.dim() == 2 else 0)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of the 2-D ``x`` is finite. Its row norms are NaN/inf when a row
    holds NaN/inf (one read of ``x``, no boolean copy); only when they are not finite -- a
    NaN/inf, or finite rows whose norm overflows -- is every entry looked at."""
    return bool(torch.isfinite(torch.linalg.vector_norm(x, dim=1)).all()) or bool(torch.isfinite(x).all())


def _query_and_block_problems(queries: torch.Tensor, item_block: torch.Tensor, row_offset: int) -> list[str]:
    """Shape, dtype and NaN/inf problems of ``queries`` and ``item_block`` (the NaN/inf messages
    start with the prefixes :func:`_problem_kinds` recognises). When ``item_block`` is not 2-D
    that is the only problem reported."""
    if item_block.dim() != 2:
        return [f"item_block must be 2-D (n_r, d), got shape {tuple(item_block.shape)}"]
    problems: list[str] = []
    d = item_block.shape[1]
    if queries.dim() != 2 or queries.shape[1] != d:
        problems.append(f"queries must be (b_r, {d}), got shape {tuple(queries.shape)}")
    if queries.dtype not in _FLOAT_DTYPES:
        problems.append(f"queries must be floating point, got {queries.dtype}")
    elif queries.numel() and not bool(torch.isfinite(queries).all()):
        bad = int((~torch.isfinite(queries)).any(dim=-1).sum()) if queries.dim() == 2 else -1
        problems.append(f"queries hold NaN/inf values ({bad} of {queries.shape[0]} users)")
    if item_block.dtype in _FLOAT_DTYPES and item_block.numel() and not _all_finite(item_block):
        bad = int((~torch.isfinite(item_block)).any(dim=-1).sum())
        problems.append(f"item rows hold NaN/inf values ({bad} rows from global id {row_offset})")
    return problems


def _rows_problems(row_offset: int, n_r: int, num_rows: int) -> list[str]:
    if not 0 <= row_offset <= num_rows or row_offset + n_r > num_rows:
        return [f"rows [{row_offset}, {row_offset + n_r}) exceed num_rows={num_rows}"]
    return []


def _device_problems(tensors: Sequence[torch.Tensor | None]) -> list[str]:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        return [f"all tensors must be on one device, got {sorted(map(str, devices))}"]
    return []


def _target_problems(
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
    """Everything wrong with this rank's :func:`rank_targets` inputs (empty list when fine)."""
    problems = _query_and_block_problems(queries, item_block, row_offset)
    if item_block.dim() != 2:
        return problems
    if targets.dim() != 1 or (queries.dim() == 2 and targets.shape[0] != queries.shape[0]):
        problems.append(
            f"targets must be (b_r,) matching queries {tuple(queries.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        problems.append(f"targets must be integer ids, got {targets.dtype}")
    elif targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= num_rows):
        problems.append(f"targets must lie in [1, {num_rows}) (row 0 is padding)")
    problems += _rows_problems(row_offset, item_block.shape[0], num_rows)
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
    return problems + _device_problems(
        [queries, targets, item_block, histories if mask_history else None]
    )


def _check_ids(ids: torch.Tensor | None, name: str, b: int | None, num_rows: int) -> list[str]:
    """Problems of a ``(b, width)`` integer id list with ids in ``[0, num_rows)`` (``None``: none)."""
    if ids is None:
        return []
    if ids.dim() != 2 or (b is not None and ids.shape[0] != b):
        return [f"{name} must be (b_r, width) with b_r = {b}, got {tuple(ids.shape)}"]
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        return [f"{name} must be integer ids, got {ids.dtype}"]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
        return [f"{name} must lie in [0, {num_rows}) (0 = padding)"]
    return []


def _target_set_problems(
    queries: torch.Tensor,
    target_ids: torch.Tensor,
    item_block: torch.Tensor,
    row_offset: int,
    num_rows: int,
    masked_ids: torch.Tensor | None,
    item_chunk: int,
) -> list[str]:
    """Everything wrong with this rank's :func:`rank_target_sets` inputs (empty list when fine)."""
    problems = _query_and_block_problems(queries, item_block, row_offset)
    if item_block.dim() != 2:
        return problems
    b = int(queries.shape[0]) if queries.dim() == 2 else None
    problems += _check_ids(target_ids, "target_ids", b, num_rows)
    problems += _check_ids(masked_ids, "masked_ids", b, num_rows)
    problems += _rows_problems(row_offset, item_block.shape[0], num_rows)
    if item_chunk < 1:
        problems.append(f"item_chunk must be >= 1, got {item_chunk}")
    return problems + _device_problems([queries, target_ids, item_block, masked_ids])


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


# --------------------------------------------------------------------------------------------
# agreement across ranks
# --------------------------------------------------------------------------------------------


def _begin_call(ks: Sequence[int], ties: str, group: dist.ProcessGroup | None
                ) -> tuple[tuple[int, ...], str, int, int, int]:
    """The checks every collective ranking call starts with: ``(ks, ties, max(ks), rank, world)``."""
    ks = check_ks(ks)
    ties = check_ties(ties)
    rank, world = rank_and_world(group)
    if world > 1 and group is not None and rank < 0:
        raise ValueError("this process is not a member of `group`")
    return ks, ties, max(ks, default=0), rank, world


def _make_header(
    problems: list[str], *, b: int, hist_len: int, queries: torch.Tensor, item_block: torch.Tensor,
    row_offset: int, num_rows: int, topk: int, mask_history: bool, max_k: int, ties: str,
    extra: Sequence[int] = (),
) -> torch.Tensor:
    """This rank's ``(_HEADER_LEN + len(extra),)`` ``torch.long`` header, on ``item_block``'s
    device; ``extra`` fills the caller's own columns after :data:`_HEADER_LEN`."""
    d = item_block.shape[-1] if item_block.dim() == 2 else -1
    n_local = int(item_block.shape[0]) if item_block.dim() == 2 else 0
    dtype_code = _FLOAT_DTYPES.index(queries.dtype) if queries.dtype in _FLOAT_DTYPES else -1
    header = [
        0 if problems else 1, b, hist_len, d, dtype_code, row_offset, n_local, num_rows,
        topk, int(mask_history), max_k, TIE_RULES.index(ties), _problem_kinds(problems),
        *extra,
    ]
    return torch.tensor(header, dtype=torch.long, device=item_block.device)


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
