"""Dropout masks, side by side: torch's `bernoulli_` at the padded shape vs `masks.draw` (same numbers).

One MiniLM-sized batch (16 examples of 5-60 tokens, padded width 64, hidden 384, 12 heads), one
thread: the hidden-state mask of a layer (real tokens only), the top layer's first-token mask, and
the attention-probability mask (real query and key pairs only). Checks that both leave the
generator in the same state (the values are checked bit for bit in tests/fast/test_masks.py), then
prints the time of each and the ratio, and the time to lay out a batch's attention-dropout runs.

    python benchmarks/masks.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hierfedlora.fast import masks
from hierfedlora.fast.packed import make_pack

B, W, HIDDEN, HEADS, KEEP = 16, 64, 384, 12, 0.9


def timed(f, repeats: int = 50) -> float:
    f()
    t = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t) / repeats


def main() -> int:
    torch.set_num_threads(1)
    assert masks.available(), "numba missing or this torch draws differently: the engine uses bernoulli_"
    lengths = np.random.default_rng(0).integers(5, 61, size=B)
    mask = torch.from_numpy((np.arange(W)[None, :] < lengths[:, None]).astype(np.int64))
    pk = make_pack(mask, W)
    rows, first = pk.noise_rows.numpy(), pk.first_noise_rows.numpy()
    cases = {
        "hidden, real tokens": (
            lambda: torch.empty(B * W, HIDDEN).bernoulli_(KEEP).div_(KEEP)[pk.noise_rows],
            lambda: masks.draw(B * W * HIDDEN, rows * HIDDEN, np.full(len(rows), HIDDEN), np.arange(len(rows)) * HIDDEN,
                               len(rows) * HIDDEN, KEEP)),
        "hidden, first tokens": (
            lambda: torch.empty(B * W, HIDDEN).bernoulli_(KEEP).div_(KEEP)[pk.first_noise_rows],
            lambda: masks.draw(B * W * HIDDEN, first * HIDDEN, np.full(B, HIDDEN), np.arange(B) * HIDDEN, B * HIDDEN, KEEP)),
        "attention, real pairs": (
            lambda: torch.empty(B, HEADS, W, W).bernoulli_(KEEP).div_(KEEP),
            lambda: masks.draw(B * HEADS * W * W, *pk.attention_runs(HEADS, False)[:3], pk.attention_runs(HEADS, False)[3][-1], KEEP)),
    }
    for name, (torch_way, ours) in cases.items():
        torch.manual_seed(1)
        a = torch_way()
        after_a = torch.rand(3)
        torch.manual_seed(1)
        ours()
        same = torch.equal(torch.rand(3), after_a)
        t_torch, t_ours = timed(torch_way), timed(ours)
        print(f"{name:24s} torch {t_torch * 1e3:6.2f} ms  ours {t_ours * 1e3:6.2f} ms  ratio {t_torch / t_ours:5.1f}x  "
              f"generator after: {'same' if same else 'DIFFERENT'}")
        if not same:
            return 1

    def layout() -> None:  # what a training step spends laying out its attention-dropout runs
        pk._runs.clear()
        pk.attention_runs(HEADS, False)
        pk.attention_runs(HEADS, True)

    print(f"{'attention runs, layout':24s} ours {timed(layout) * 1e3:6.2f} ms per batch (a full and a first-token layer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
