"""Counter-based standard normals, one stream per (seed, purpose, user): vectorised over users.

:class:`UserNormalStreams` gives every user of a batch its own stream of N(0, 1) float32
values, a pure function of ``(seed, purpose, user, position)``: a user's noise does not depend
on the batch it sits in, its row, the other users or the world size, and one batched draw
replaces a ``torch.Generator`` per user. :func:`randn` is what models call: a
``torch.Generator`` draws ``torch.randn`` as always, a :class:`UserNormalStreams` draws from the
streams (``SequenceRecommender.draw_eval_noise`` takes either).

Construction (all integers are 32-bit words held in int64 tensors; every multiplier is below
2^31 and every product is masked to 32 bits at once, so no signed 64-bit overflow ever happens
and eager and ``torch.compile`` code agree bit for bit):

* ``h(x)``: Chris Wellons' ``lowbias32`` (``x ^= x >> 16; x *= 0x21f0aaad; x ^= x >> 15;
  x *= 0x735a2d97; x ^= x >> 15``, mod 2^32), a bijection of 32-bit words.
* ``E_k``: a Feistel network on 64-bit blocks ``(hi, lo)`` keyed by a 64-bit ``k = (k0, k1)``,
  round r: ``(hi, lo) <- (lo, hi ^ h(lo ^ k[r % 2] ^ C_r))`` with fixed round constants C_r.
  Whatever the round function, a Feistel network is a bijection of its 2^64 blocks.
* stream key: ``K = stream_seed(seed, "counter:" + purpose)`` (63 bits, blake2b), and user u's
  key ``S_u = E_K(u)`` (:data:`KEY_ROUNDS` rounds over the user id's two words). For one seed,
  ``u -> S_u`` is a bijection: two users never share a key. Across seeds the keys are
  unrelated (blake2b), and two (seed, user) pairs share a key only by chance, with
  probability 2^-64 a pair.
* block p of user u's stream: ``(w0, w1) = E_{S_u}(p)`` (:data:`ROUNDS` rounds over p's two
  words). For one key, ``p -> E_{S_u}(p)`` is a bijection, so no 64-bit block repeats within a
  stream over the whole 2^63 counter range (the period is the counter range); different
  streams are different permutations, so two streams share a block only at unrelated
  positions, at the rate of independent random streams, never systematically (a shifted copy
  or a common prefix would need equal keys).
* normals: block p gives the pair of values at positions 2p, 2p + 1 by Box-Muller, using both
  outputs: ``u1 = (2 (w0 >> 8) + 1) / 2^25`` and ``u2 = (2 (w1 >> 8) + 1) / 2^25``, uniforms in
  (0, 1) from 24 bits each (mid-points of the 2^24 cells, never 0 or 1), then
  ``r = sqrt(-2 ln u1)``, value 2p = r cos(2 pi u2), value 2p + 1 = r sin(2 pi u2). The
  largest |value| is r's bound sqrt(2 * 25 ln 2) = 5.89 (a normal passes it with probability
  4e-9). The logarithm, square root and sine/cosine are written here with float32 ``+``, ``*``,
  compares and exact integer operations only (Cephes' ``logf``, ``sinf``, ``cosf`` polynomials,
  Newton steps for the square root, exponents by compare-and-scale cascades): torch's own
  ``log``/``sqrt``/``cos``/``sin`` differ in the last bit between eager ATen (MKL's vector
  functions on large tensors) and inductor's kernels, and these do not (inductor compiles
  without floating-point contraction or unsafe math). No float/int bit casts either: inductor
  lowers those to scalar loops. Accuracy: a few float32 ulps.

A draw of shape ``(B, *rest)`` gives user b the values at positions ``offset .. offset + n - 1``
of its stream (``n = prod(rest)``, row-major) and advances ``offset`` by n, so successive draws
continue every stream, as a generator does: draws of ``(B, 3)`` then ``(B, 5)`` equal the two
slices of one ``(B, 8)`` draw.

Speed: large draws (:data:`COMPILE_MIN_VALUES` values or more, and every draw once it is
compiled) run one fused ``torch.compile`` kernel on the CPU (dynamic shapes, compiled once
per process; the eager ops on failure, as :mod:`recsys_dist.eval.onepass` does): about 6 ns a
value on one thread, spread over the intra-op threads. The eager ops (~250 passes, over
chunks of users that stay in cache) cost ~100-150 ns a value: 10-20x the per-user
``torch.Generator`` loop they replace, so a machine without a C++ compiler (which inductor
needs) pays that. Measured costs per user: docs/evaluation.md.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

log = logging.getLogger("recsys_dist.noise")

#: ``eval.noise``: counter-based streams (this module) | a torch.Generator per user (before)
EVAL_NOISE_KINDS = ("counter", "generator")
MASK = 0xFFFFFFFF
#: Feistel rounds of a user's key from (seed, purpose) and its id (once per user and draw)
KEY_ROUNDS = 6
#: Feistel rounds of one 64-bit block of a stream (per pair of values)
ROUNDS = 4
#: round constants (the first SHA-256 round constants)
ROUND_CONSTANTS = (0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1,
                   0x923F82A4, 0xAB1C5ED5)
#: draws of at least this many values (over the batch) run the compiled kernel, and once it is
#: compiled every draw does; before, smaller ones run the same ops eagerly (the compilation
#: costs seconds, once per process, and tests draw little)
COMPILE_MIN_VALUES = 1 << 16
#: the eager ops run over chunks of users of about this many blocks (their ~250 passes over
#: the chunk then stay in cache: ~30 % faster than one pass over a whole batch)
EAGER_CHUNK_PAIRS = 1 << 15
#: how many draws took each path (for tests and benchmarks)
CALLS = {"compiled": 0, "eager": 0}


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 of 32-bit words in an int64 tensor (no product reaches 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK
    return x ^ (x >> 15)


def feistel(hi: torch.Tensor, lo: torch.Tensor, k0, k1, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keyed 64-bit block permutation ``E_k`` (module docstring) on words ``(hi, lo)``."""
    for r in range(rounds):
        key = (k0 if r % 2 == 0 else k1) ^ ROUND_CONSTANTS[r]
        hi, lo = lo, hi ^ hash32(lo ^ key)
    return hi, lo


def _log_unit(k: torch.Tensor) -> torch.Tensor:
    """float32 ln((2k + 1) / 2^25) for int64 k in [0, 2^24): Cephes' logf on float32 + and *
    only. The exponent comes from a compare-and-scale cascade on the exact float 2k (same bit
    length as 2k + 1), so 2k + 1 = 2^e (1 + f) with f exact (it has at most 24 bits)."""
    h = (k << 1).to(torch.float32)  # 2k < 2^25, even: exact
    scale = torch.ones_like(h)
    e = torch.zeros_like(h)
    for s in (16, 8, 4, 2, 1):  # h -> h 2^-e in [1, 2) (h = 0 stays 0: k = 0, e = 0)
        c = h >= float(1 << s)
        h = torch.where(c, h * 2.0 ** -s, h)
        scale = torch.where(c, scale * 2.0 ** -s, scale)
        e = torch.where(c, e + float(s), e)
    f = (h - 1.0) + scale  # (2k + 1) 2^-e - 1, exact
    big = f >= 0.41421356237309503  # 1 + f >= sqrt(2): use (1 + f) / 2 - 1
    x = torch.where(big, (f - 1.0) * 0.5, f)
    e = torch.where(big, e + 1.0, e) - 25.0
    z = x * x
    y = 7.0376836292e-2 * x - 1.1514610310e-1
    for c in (1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1,
              -2.4999993993e-1, 3.3333331174e-1):
        y = y * x + c
    y = y * x * z
    y = y + e * -2.12194440e-4
    y = y + z * -0.5
    return x + y + e * 0.693359375


def _sqrt_pos(x: torch.Tensor) -> torch.Tensor:
    """float32 sqrt(x) for x in [2^-24, 2^6): scaled by even powers of 2 into [1, 4), a
    quadratic guess of 1/sqrt (4.7 % off at worst) and three Newton steps (float32 + and *)."""
    y = x * 2.0 ** 24
    g = torch.ones_like(y)
    for s in (16, 8, 4, 2):
        c = y >= float(1 << s)
        y = torch.where(c, y * 2.0 ** -s, y)
        g = torch.where(c, g * 2.0 ** (s // 2), g)
    r = (0.0446324034 * y - 0.370016835) * y + 1.27889388  # ~ 1 / sqrt(y)
    for _ in range(3):
        r = r * (1.5 - y * 0.5 * r * r)
    return y * r * g * 2.0 ** -12


def _cos_sin_turn(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) of 2 pi n / 2^25 for int64 n in [0, 2^25): the nearest quarter turn
    by integer arithmetic, then Cephes' cosf/sinf polynomials on [-pi/4, pi/4]."""
    q = (n + (1 << 22)) >> 23  # the nearest multiple of a quarter turn (2^23), 0..4
    x = (n - (q << 23)).to(torch.float32) * (math.pi / (1 << 24))  # |x| <= pi / 4, exact integer first
    z = x * x
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * x + x
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - z * 0.5 + 1.0
    q = q & 3
    swap = (q & 1) == 1
    cos, sin = torch.where(swap, s, c), torch.where(swap, c, s)
    return torch.where(((q + 1) & 2) == 2, -cos, cos), torch.where((q & 2) == 2, -sin, sin)


def normal_blocks(users: torch.Tensor, key: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(B, P, 2) float32: the normals at positions (2p, 2p + 1) of the streams of ``users``
    (B, 1) int64 under the (seed, purpose) key ``key`` (2,) int64 = (K >> 32, K & 0xFFFFFFFF),
    for the block numbers ``pairs`` (P,) int64 (eager ops; :func:`_blocks` compiles them)."""
    k0, k1 = feistel((users >> 32) & MASK, users & MASK, key[0], key[1], KEY_ROUNDS)  # the users' keys
    w0, w1 = feistel(pairs >> 32, pairs & MASK, k0, k1, ROUNDS)
    r = _sqrt_pos(_log_unit(w0 >> 8) * -2.0)
    cos, sin = _cos_sin_turn(((w1 >> 8) << 1) + 1)
    return torch.stack([r * cos, r * sin], dim=-1)


_compiled = None


def _blocks(users: torch.Tensor, key: torch.Tensor, pairs: torch.Tensor, compiled: bool) -> torch.Tensor:
    """:func:`normal_blocks`, through ``torch.compile`` when ``compiled`` (one fused loop instead
    of ~250 eager passes); eagerly, once and for good, if compilation fails (same values)."""
    global _compiled
    if compiled and _compiled is not False:
        b, p = users.shape[0], pairs.shape[0]
        # sizes 0/1 and equal sizes would be specialised by dynamo (a recompilation): pad
        pad_b = max(2 - b, 0)
        pad_p = max(2 - p, 0)
        pad_p += int(b + pad_b == p + pad_p)
        if pad_b:
            users = torch.cat([users, users[:1].expand(pad_b, 1)])
        if pad_p:
            pairs = torch.cat([pairs, pairs[-1:] + torch.arange(1, pad_p + 1, device=pairs.device)])
        try:
            if _compiled is None:
                _compiled = torch.compile(normal_blocks, dynamic=True)
            with torch.no_grad():  # one grad mode: dynamo guards on it
                out = _compiled(users, key, pairs)
            CALLS["compiled"] += 1
            return out[:b, :p] if pad_b or pad_p else out
        except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler on this machine
            log.warning("torch.compile of the eval-noise kernel failed (%s: %s); drawing eagerly",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _compiled = False
            users, pairs = users[:b], pairs[:p]
    CALLS["eager"] += 1
    rows = max(1, EAGER_CHUNK_PAIRS // max(int(pairs.shape[0]), 1))  # ~250 passes: keep them in cache
    if users.shape[0] <= rows:
        return normal_blocks(users, key, pairs)
    return torch.cat([normal_blocks(part, key, pairs) for part in users.split(rows)])


class UserNormalStreams:
    """One N(0, 1) float32 stream per user, keyed by ``(seed, purpose, user)`` (module docstring).

    users: (B,) int64 ids (any int64). ``compiled``: True/False force the compiled kernel or
    the eager ops (the values are identical); None (default): the compiled kernel for draws of
    :data:`COMPILE_MIN_VALUES` values or more, and for all draws once it is compiled. Draws go
    through :func:`randn`, which models call with this in place of a ``torch.Generator``.
    ``device``: where the values are computed and returned (default CPU). Off the CPU the eager
    ops run (never compiled: Triton contracts multiply-adds); they are exact float32 ``+``/``*``
    and integer operations, so every device gives the same bits (tests/test_eval_noise.py checks
    CUDA where there is one).
    """

    def __init__(self, seed: int, purpose: str, users: torch.Tensor, compiled: bool | None = None,
                 device: torch.device | str | None = None):
        from recsys_dist.config import stream_seed  # here: config imports the models, which import this

        self.device = torch.device(device if device is not None else "cpu")
        users = torch.as_tensor(users, dtype=torch.int64).reshape(-1).to(self.device)
        key = stream_seed(seed, f"counter:{purpose}")
        self.key = torch.tensor([key >> 32, key & MASK], dtype=torch.int64,
                                device=self.device)  # a tensor: no recompile per seed
        self.users = users
        self._column = users[:, None].clone()  # not a view: dynamo guards a view's base
        self.offset = 0  # the next position of every user's stream
        self.compiled = compiled if self.device.type == "cpu" else False

    @property
    def batch_size(self) -> int:
        return int(self.users.shape[0])

    @torch.no_grad()
    def normal(self, rest: Sequence[int]) -> torch.Tensor:
        """(B, *rest) float32: row b holds user b's next prod(rest) values, row-major."""
        rest = tuple(int(r) for r in rest)
        n = math.prod(rest)
        b = self.batch_size
        if n == 0 or b == 0:
            return torch.empty((b, *rest), dtype=torch.float32, device=self.device)
        start, end = self.offset >> 1, (self.offset + n + 1) >> 1  # blocks holding the positions
        pairs = torch.arange(start, end, dtype=torch.int64, device=self.device)
        compiled = self.compiled
        if compiled is None:  # large draws, and any draw once the kernel is compiled
            compiled = b * n >= COMPILE_MIN_VALUES or _compiled not in (None, False)
        flat = _blocks(self._column, self.key, pairs, compiled).reshape(b, -1)
        first = self.offset & 1
        self.offset += n
        return flat[:, first:first + n].reshape(b, *rest).contiguous()


def randn(shape: Sequence[int], generator: torch.Generator | UserNormalStreams) -> torch.Tensor:
    """Standard normals of ``shape`` (float32): ``torch.randn(shape, generator=generator)`` for a
    ``torch.Generator`` (CPU); for :class:`UserNormalStreams` (on its device), shape[0] must be
    its batch size and row b continues user b's stream."""
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, UserNormalStreams):
        if not shape or shape[0] != generator.batch_size:
            raise ValueError(f"randn: shape {shape} does not lead with the streams' batch size "
                             f"{generator.batch_size}")
        return generator.normal(shape[1:])
    return torch.randn(shape, generator=generator)
