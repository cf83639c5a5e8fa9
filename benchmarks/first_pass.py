"""The first pass through the frozen layers, with and without the workers' heap setting.

W2's setting (real MiniLM, `rotten_tomatoes`, the cache below layer 4), one thread:
`FastModel.prefix_rows` for 64 training examples (embeddings and the four frozen layers), as a
worker runs them, in a fresh process with glibc's default malloc settings and in one that first
calls `fast.workers._keep_heap`, as the workers do. Two processes of each, alternating; the better of
each. With `--chunks`, the time of 256 examples passed 64, 128, ... at a time instead (the size of
`FrozenPrefix.CHUNK`). (The version in the commit that added this file also timed a way of
laying out attention that was not kept: see docs/benchmarks.md.)

With `--zero-lora`, the same pass with and without skipping the LoRA of the frozen layers (B = 0:
`fast.packed._zero_lora`), alternating six times in one process; the medians.

    python benchmarks/first_pass.py
    python benchmarks/first_pass.py --chunks 32,64,128,256
    python benchmarks/first_pass.py --zero-lora
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import torch

from hierfedlora.engine import Simulation
from speed import config

EXAMPLES, REPEATS = 64, 20


def setup(examples: int = EXAMPLES, keep_heap: bool = True):
    """W2's model, one thread, and the token ids of `examples` training examples."""
    if keep_heap:
        from hierfedlora.fast.workers import _keep_heap

        _keep_heap()
    torch.set_num_threads(1)
    sim = Simulation(config({"name": "fedlora_topk", "depth": 2}, False, 1, 1))
    w = sim.work
    return sim, [w.ids[k] for k in np.random.default_rng(0).choice(w.train, examples, replace=False)]


def chunks(sizes: list[int]) -> None:
    """256 examples passed `FrozenPrefix.CHUNK` at a time, for each size (heap kept)."""
    sim, ids = setup(256)
    for size in sizes:
        sim.model.prefix.CHUNK = size
        print(f"first pass, 256 examples in chunks of {size}: {mean(lambda: sim.model.prefix_rows(ids), 5) * 1e3:.0f} ms")


def zero_lora() -> None:
    """The first pass with the zero-LoRA skip and with the LoRA products computed (heap kept)."""
    from hierfedlora.fast import packed

    sim, ids = setup()
    skip, times = packed._zero_lora, {"skipped": [], "computed": []}
    for _ in range(6):
        for name, rule in (("skipped", skip), ("computed", lambda mod: False)):
            packed._zero_lora = rule
            times[name].append(mean(lambda: sim.model.prefix_rows(ids), 8) * 1e3)
    packed._zero_lora = skip
    s, c = float(np.median(times["skipped"])), float(np.median(times["computed"]))
    print(f"first pass, {EXAMPLES} examples, 4 frozen layers: LoRA (B = 0) computed {c:.1f} ms  skipped {s:.1f} ms  "
          f"({(c - s) / c * 100:.1f}% less)")


def mean(f, repeats: int = REPEATS) -> float:
    """Seconds per call, over `repeats` calls after one to warm up (a mean, not the best call: page
    faults and the like come in some calls, not all, and a run pays for all of them)."""
    f()
    t = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - t) / repeats


def heap_child(keep: bool) -> None:
    """Runs in a fresh process: prints the mean time of the first pass, in ms."""
    sim, ids = setup(keep_heap=keep)
    print(f"{mean(lambda: sim.model.prefix_rows(ids)) * 1e3:.1f}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--heap-default", "--heap-kept"):
        heap_child(sys.argv[1] == "--heap-kept")
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--zero-lora":
        zero_lora()
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "--chunks":
        chunks([int(x) for x in sys.argv[2].split(",")])
        return 0
    times = {"default": [], "kept": []}
    for _ in range(2):
        for name in times:
            out = subprocess.run([sys.executable, __file__, f"--heap-{name}"], capture_output=True, text=True, check=True)
            times[name].append(float(out.stdout.strip().splitlines()[-1]))
    d, k = min(times["default"]), min(times["kept"])
    print(f"first pass, {EXAMPLES} examples, 4 frozen layers: default malloc {d:.1f} ms  heap kept {k:.1f} ms  "
          f"({(d - k) / d * 100:.1f}% less)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
