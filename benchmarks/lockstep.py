"""Devices trained together (`train.lockstep`) against one at a time, in one process.

W2's setting of `benchmarks/speed.py` (real MiniLM, `rotten_tomatoes`, top 2 layers trained, cache
below layer 4), one thread: the first local round (8 steps of batch 16) of 10 devices, as a worker
runs its share of a round, with `fast.joined.run_jobs` at each lockstep value. Their examples are cached
by a first call, so this times the training steps alone. The values take turns, three times; the
median of each. The outputs are the same at every value (tests/fast/test_joined.py checks bit for bit).

    python benchmarks/lockstep.py                 # W2
    python benchmarks/lockstep.py --workload W1   # every layer trained, no cache
    python benchmarks/lockstep.py --devices 4 --values 1,2,4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hierfedlora.device.train import DeviceData
from hierfedlora.engine import Simulation
from hierfedlora.fast.joined import run_jobs
from hierfedlora.fast.workers import _keep_heap
from hierfedlora.lora_state import to_device
from hierfedlora.protocol import DeviceJob, DevicePlan, LocalTraining
from speed import config

DEVICES, REPEATS = 10, 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=("W1", "W2"), default="W2")
    ap.add_argument("--values", default="1,4,5,10", help="lockstep values to time")
    ap.add_argument("--devices", type=int, default=DEVICES, help="devices (jobs) in the run")
    args = ap.parse_args()
    _keep_heap()  # as the workers do
    torch.set_num_threads(1)
    method = {"name": "fedlora_topk", "depth": 2} if args.workload == "W2" else {"name": "fedlora"}
    sim = Simulation(config(method, False, 1, 1))
    w, m = sim.work, sim.model
    layers = tuple(getattr(sim.strategy, "layers", range(m.num_layers)))
    jobs = []
    for d in range(args.devices):
        plan = DevicePlan(d, sim.global_ranks, layers, sim.cfg.train.local_steps)
        jobs.append((DeviceData(w.ids, w.labels, w.parts[d], w.pad_id), DeviceJob(plan, to_device(sim.state, plan.ranks, sim.global_ranks), 0)))
    kw = dict(seed=0, batch_size=sim.cfg.train.batch_size, lr=sim.cfg.train.lr, weight_decay=0.0, backward_ratio=2.0)
    values = [int(v) for v in args.values.split(",")]
    run_jobs(m, jobs, 1, LocalTraining(**kw, lockstep=max(values)))  # fills the cache
    times: dict[int, list[float]] = {v: [] for v in values}
    for _ in range(REPEATS):
        for v in values:
            t = time.perf_counter()
            run_jobs(m, jobs, 1, LocalTraining(**kw, lockstep=v))
            times[v].append(time.perf_counter() - t)
    one = float(np.median(times[values[0]]))
    for v in values:
        med = float(np.median(times[v]))
        print(f"{args.workload}, {args.devices} devices x {sim.cfg.train.local_steps} steps, lockstep {v:2d}: {med:.2f} s "
              f"({(one - med) / one * 100:.1f}% less time than lockstep {values[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
