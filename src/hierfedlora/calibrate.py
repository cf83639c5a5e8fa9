"""Measure this machine as a device of the fleet: `hierfedlora calibrate` (README, "Fleet file format").

The simulated clock charges a device `FLOPs / flops` seconds per local step (`clock.compute_time`),
with FLOPs counted by `clock.step_flops` from the batch's real shapes. A profile is only as good as
that `flops`, so it is measured the way the clock will use it: run the very job a device runs
(`device.train.run_job`: LoRA on every layer, AdamW, batch × max_length tokens of the chosen model),
time it, and divide the FLOPs the clock counts for that job by the seconds it took. That is the
*sustained* training rate at the model's shapes (attention, LoRA's small matmuls and the optimiser
included), not a peak: it is what makes a simulated step last what a real one does on this machine.

Memory is what is free now (the OS's available memory; a GPU's free memory when `--device` is one),
since other programs on a real device keep theirs. Links are not measured here: the profile takes
the WAN/LAN figures it is given (defaults: the fleet file's defaults), and says so in its comment.

The output is a fleet file (`fleet.load_fleet_file`) with one `[[device]]` table; files of several
machines concatenate into one fleet (`cat a.toml b.toml > fleet.toml`).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Measurement:
    """One calibration: sustained training FLOP/s over `repeats` timed jobs (median), free memory."""

    model: str
    device: str
    batch_size: int
    max_length: int
    rank: int
    steps: int
    job_flops: float  # the clock's FLOPs of one job (steps local steps)
    job_seconds: list[float]  # wall time of each timed job
    memory_gb: float

    @property
    def flops(self) -> float:
        """FLOP/s = job FLOPs / median job seconds."""
        return self.job_flops / statistics.median(self.job_seconds)


def free_memory_gb(device: str = "cpu") -> float:
    """Memory free for training now: a CUDA device's free memory, else the OS's available memory
    (MemAvailable on Linux; all physical memory where the OS does not say)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0] / 1e9
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def measure(model_name: str = "minilm", batch_size: int = 16, max_length: int = 64, rank: int = 8, steps: int = 4,
            repeats: int = 3, device: str = "cpu", seed: int = 0) -> Measurement:
    """Time `repeats` full-depth training jobs of `steps` steps (after one untimed warm-up job) on
    random token ids of exactly `max_length` tokens, the batch the clock then prices."""
    import torch

    from hierfedlora.device.model import LocalModel, load_base, load_tokenizer
    from hierfedlora.device.train import DeviceData, run_job
    from hierfedlora.lora_state import to_device
    from hierfedlora.protocol import DeviceJob, DevicePlan, LocalTraining

    tok = load_tokenizer(model_name)
    model = LocalModel(load_base(model_name, 2, tok, seed), None, rank, 2.0 * rank, 0.0, seed, device)
    rng = np.random.default_rng(seed)
    n = batch_size * steps
    vocab = len(tok)
    ids = [rng.integers(min(1000, vocab // 2), vocab, max_length).astype(np.int64) for _ in range(n)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    data = DeviceData(ids, rng.integers(0, 2, n), np.arange(n), pad)
    ranks = {l: rank for l in range(model.num_layers)}
    payload = to_device(model.init_state(ranks), ranks, ranks)
    plan = DevicePlan(0, ranks, tuple(range(model.num_layers)), steps)
    settings = LocalTraining(seed=seed, batch_size=batch_size, lr=1e-3, weight_decay=0.0, backward_ratio=1.0)
    seconds, flops = [], 0.0
    for call in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run_job(model, data, DeviceJob(plan, payload, call), 0, settings)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if call:  # the first job warms up allocator and kernels
            seconds.append(time.perf_counter() - start)
        flops = out.flops
    return Measurement(model_name, device, batch_size, max_length, rank, steps, flops, seconds, free_memory_gb(device))


def fleet_file_text(m: Measurement, kind: str, count: int = 1, wan_up_mbps: float = 10.0,
                    wan_down_mbps: float | None = None, wan_latency_ms: float = 50.0) -> str:
    """The measurement as a fleet file (`fleet.load_fleet_file`'s format), with how it was measured."""
    down = 2 * wan_up_mbps if wan_down_mbps is None else wan_down_mbps
    secs = ", ".join(f"{s:.3f}" for s in m.job_seconds)
    return (f"# measured by `hierfedlora calibrate`: {m.model} on {m.device}, batch {m.batch_size} x {m.max_length} tokens,\n"
            f"# LoRA r = {m.rank} in every layer, {m.steps} steps per job; {m.job_flops:.4g} FLOPs per job in {secs} s\n"
            f"# (median). memory_gb: free when measured. The links are not measured: the figures given to calibrate.\n"
            f"[[device]]\n"
            f"kind = \"{kind}\"\n"
            f"count = {count}\n"
            f"flops = {m.flops:.6g}\n"
            f"memory_gb = {m.memory_gb:.3f}\n"
            f"wan_up_mbps = {wan_up_mbps:g}\n"
            f"wan_down_mbps = {down:g}\n"
            f"wan_latency_ms = {wan_latency_ms:g}\n")
