"""Dropout masks as torch's CPU generator draws them, computed only where they are used.

Why our own code: to give the same results as a plain loop, the packed forward draws every dropout
mask at the shape of a padded batch (`packed` module docstring). torch's CPU `bernoulli_` draws two
Mersenne-Twister words per element, one by one, and most of a padded mask is never read: padding,
and in the top layer every token but the first (what this saves: `python benchmarks/masks.py`; the
share of a step it took: docs/benchmarks.md). Here the generator's state is read, advanced by
exactly the words `bernoulli_` would consume (the twist of each 624-word block still runs, it is
cheap), and only the entries in use are tempered and compared; the state is written back, so the
stream after the call is the one `bernoulli_` leaves. `tests/fast/test_masks.py` checks equality bit
for bit.

What torch does (ATen, CPU, `bernoulli_(p)` on a float tensor): for each element in order,
`u = (random64() & (2**53 - 1)) * 2**-53` with `random64() = (word1 << 32) | word2`, and the
element is `u < p`. Dropout then divides by p. We check this once against torch itself
(`available()`); where it does not hold (another torch, or numba missing), callers use torch's
`bernoulli_` as before.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install working
    numba = None

N, M = 624, 397
_STATE = slice(24, 24 + 8 * N)  # torch's CPU generator state: seed u64, left i32, seeded i32, next u64, 624 x u64


def _twist(s):
    for i in range(N - M):
        y = (s[i] & 0x80000000) | (s[i + 1] & 0x7FFFFFFF)
        s[i] = s[i + M] ^ (y >> 1) ^ ((-(s[i + 1] & 1)) & 0x9908B0DF)
    for i in range(N - M, N - 1):
        y = (s[i] & 0x80000000) | (s[i + 1] & 0x7FFFFFFF)
        s[i] = s[i + M - N] ^ (y >> 1) ^ ((-(s[i + 1] & 1)) & 0x9908B0DF)
    y = (s[N - 1] & 0x80000000) | (s[0] & 0x7FFFFFFF)
    s[N - 1] = s[M - 1] ^ (y >> 1) ^ ((-(s[0] & 1)) & 0x9908B0DF)


def _temper(y):
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    return y ^ (y >> np.uint32(18))


def _kept(hi, lo, thr_hi, thr_lo):
    """bernoulli's test on one element from its two words, ((hi << 32 | lo) & (2**53 - 1)) <
    threshold, in 32-bit halves (threshold = thr_hi << 32 | thr_lo) so that it vectorises."""
    h = _temper(hi) & np.uint32(0x1FFFFF)
    return (h < thr_hi) | ((h == thr_hi) & (_temper(lo) < thr_lo))


def _fill(s, left, nxt, numel, src, length, dst, out, thr_hi, thr_lo, value):
    """Advance the generator (state `s`, `left`, `nxt`) past a `numel`-element `bernoulli_`; for
    each run k (ascending `src`), out[dst[k] + t] = value if element src[k] + t is kept, else 0.
    Returns the new (left, nxt)."""
    zero = np.float32(0.0)
    base, end = -np.int64(nxt), np.int64(left) - 1  # stream word w is s[w - base] while w < end
    for k in range(len(src)):
        w, stop, o = 2 * src[k], 2 * (src[k] + length[k]), dst[k]
        while w < stop:
            while w >= end:
                _twist(s)
                base, end = end, end + N
            pairs = (min(stop, end) - w) // 2  # whole elements in this block: the hot loop
            words, dest = s[w - base:w - base + 2 * pairs], out[o:o + pairs]  # views: the loop vectorises
            for p in range(pairs):
                dest[p] = value if _kept(words[2 * p], words[2 * p + 1], thr_hi, thr_lo) else zero
            w += 2 * pairs
            o += pairs
            if w < stop and w + 1 == end:  # an element whose two words straddle a twist
                hi = s[w - base]
                _twist(s)
                base, end = end, end + N
                out[o] = value if _kept(hi, s[w + 1 - base], thr_hi, thr_lo) else zero
                w += 2
                o += 1
    total = 2 * np.int64(numel)
    while total > end:
        _twist(s)
        base, end = end, end + N
    return end - total + 1, total - base


if numba is not None:
    _twist = numba.njit(cache=True)(_twist)
    _temper = numba.njit(cache=True)(_temper)
    _kept = numba.njit(cache=True)(_kept)
    _fill = numba.njit(cache=True)(_fill)

_checked: bool | None = None


def draw(numel: int, src: np.ndarray, length: np.ndarray, dst: np.ndarray, size: int, keep: float) -> torch.Tensor:
    """What `torch.empty(numel).bernoulli_(keep).div_(keep)` would hold at the runs (`src`,
    `length`) of its flat index, written at `dst` of a zero float32 tensor of `size` elements;
    the default CPU generator is left as that call leaves it. Runs need not be sorted, but must
    not overlap and must lie inside the `numel` elements."""
    order = np.argsort(src, kind="stable")
    a, n = src[order], length[order]
    if len(a) and (a[0] < 0 or a[-1] + n[-1] > numel or np.any(a[1:] < a[:-1] + n[:-1])):
        raise ValueError("masks.draw: runs overlap or leave the mask")
    out = np.zeros(size, np.float32)
    rng = torch.get_rng_state()
    raw = rng.numpy()
    s = raw[_STATE].view(np.uint64).astype(np.uint32)
    left = int(raw[8:12].view(np.int32)[0])
    nxt = int(raw[16:24].view(np.uint64)[0])
    t = _threshold(keep)
    left, nxt = _fill(s, left, nxt, numel, a.astype(np.int64), n.astype(np.int64),
                      dst[order].astype(np.int64), out, np.uint32(t >> 32), np.uint32(t & 0xFFFFFFFF),
                      np.float32(_value(keep)))
    raw = raw.copy()
    raw[_STATE] = s.astype(np.uint64).view(np.uint8)
    raw[8:12] = np.array([left], np.int32).view(np.uint8)
    raw[16:24] = np.array([nxt], np.uint64).view(np.uint8)
    torch.set_rng_state(torch.from_numpy(raw))
    return torch.from_numpy(out)


def _threshold(keep: float) -> int:
    """u < keep  <=>  bits < ceil(keep * 2**53) (u = bits * 2**-53 exactly; keep in [0, 1])."""
    t = keep * 2.0 ** 53  # exact: a power-of-two scale
    return int(np.ceil(t))


_values: dict[float, float] = {}


def _value(keep: float) -> float:
    """A kept element's value, as torch computes it (1.0 / keep in float32, by its own kernel)."""
    if keep not in _values:
        _values[keep] = float(torch.ones(64).div_(keep)[0])
    return _values[keep]


def available() -> bool:
    """Whether `draw` reproduces torch's `bernoulli_` here (checked once against torch itself)."""
    global _checked
    if _checked is None:
        _checked = numba is not None and _self_check()
    return _checked


def _self_check() -> bool:
    state = torch.get_rng_state()
    try:
        ok = True
        for seed, numel, keep in ((1, 7, 0.9), (2, 1000, 0.5), (3, 1500, 0.8)):  # crosses twists, odd word offsets
            torch.manual_seed(seed)
            torch.rand(seed * 5)  # start mid-block
            want = torch.empty(numel).bernoulli_(keep).div_(keep)
            after = torch.rand(3)
            torch.manual_seed(seed)
            torch.rand(seed * 5)
            idx = np.arange(numel, dtype=np.int64)
            got = draw(numel, idx, np.ones(numel, np.int64), idx, numel, keep)
            ok = ok and torch.equal(got, want) and torch.equal(torch.rand(3), after)
        return ok
    except Exception:  # noqa: BLE001 - any failure means: use torch's own bernoulli_
        return False
    finally:
        torch.set_rng_state(state)
