"""On a GPU: the packed forward against the plain transformers forward (why `fast.model` packs on CPU only).

    python benchmarks/gpu_forward.py

Times whole engine rounds of `benchmarks/speed.py`'s W1 and W2 (MiniLM, rotten_tomatoes, 20 devices
x 8 local steps of batch 16, one evaluation), alternating the two forwards on one simulator, prefix
cache off. Measured on an H100 (best of 2 rounds each): W1 3.4 s plain, 14.6 s packed per round;
W2 2.5 s plain, 7.6 s packed (an earlier run: W1 3.5 s against 14.8 s).
"""

from __future__ import annotations

import time

import torch
from speed import config

from hierfedlora.engine import Simulation
from hierfedlora.fast import packed


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark compares forwards on a GPU")
        return 1
    for name, method in (("W1", {"name": "fedlora"}), ("W2", {"name": "fedlora_topk", "depth": 2})):
        cfg = config(method, False, 0, 1)
        cfg.train.device, cfg.train.prefix_cache = "cuda", False
        sim = Simulation(cfg)
        inner = sim.model.peft.base_model.model
        best: dict[str, float] = {}
        for mode in ("plain", "packed", "plain", "packed"):
            sim.model.packed = packed.PackedEncoder(inner) if mode == "packed" else None
            torch.cuda.synchronize()
            t = time.perf_counter()
            row = sim.step()
            torch.cuda.synchronize()
            best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - t)
            print(f"{name} {mode}: {time.perf_counter() - t:.2f} s per round, test acc {row['test_acc']:.4f}", flush=True)
        print(f"{name}: plain {best['plain']:.2f} s, packed {best['packed']:.2f} s per round (best of 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
