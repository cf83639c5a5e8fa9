"""Simulation speed, side by side: our engine against a plain PEFT loop (see docs/benchmarks.md).

The reference is FedLoRA written the usual way: one PEFT model; for each device, load the global
adapter into it, pad every batch to `max_length`, train the local steps with AdamW, hand the adapter
back; FedAvg; evaluate the test split padded the same way. It uses the engine's batches and seeds,
and the engine's training rule that frozen layers run without dropout, so both paths must end with
the same adapter and accuracy; the benchmark checks that, then reports how much faster the engine is.

Workloads (real MiniLM, rotten_tomatoes, 20 devices, 2 rounds of 8 local steps of batch 16, one
evaluation per round): W1 = FedLoRA (LoRA in all 6 layers), W2 = every device trains the top 2
layers (`fedlora_topk`, depth 2). Rounds of the two paths alternate, so machine noise hits both.
The last line reads `W1 speedup=<x> W2 speedup=<y> flop_util=<z>`: flop_util is the engine's
achieved FLOP/s while training W1 (forward + backward of the trained layers, counted from the real
token lengths as the simulated clock counts them) over this machine's measured dense matmul peak.

    python benchmarks/speed.py            # the full benchmark (~6 min on a quiet 2-core CPU)
    python benchmarks/speed.py --quick    # 4 devices, 4 steps, 256 test examples (< 3 min)
    python benchmarks/speed.py --threads 1 --workers 1   # one core each: the work saved, without parallelism
    py-spy record --subprocesses --format raw -r 50 -o w2.txt -- python benchmarks/speed.py --engine-only --workloads W2
    python benchmarks/profile_summary.py w2.txt          # where the engine's time goes
    python benchmarks/speed.py --engine-only --workloads W2 --timeline   # when each worker was busy
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from hierfedlora.config import build_config
from hierfedlora.data import collate
from hierfedlora.engine import Simulation
from hierfedlora.lora_state import State, parse_key
from hierfedlora.device.model import find_layers, load_base
from hierfedlora.device.train import sample_batches, torch_seed


def config(method: dict, quick: bool, threads: int, workers: int = 1):
    devices, steps, test = (4, 4, 256) if quick else (20, 8, 1000)
    return build_config({  # everything the comparison depends on is pinned here, not left to defaults
        "run": {"seed": 0, "rounds": 2, "eval_every": 1, "progress": False},
        "model": {"name": "minilm", "max_length": 64, "rank": 8, "alpha": 16.0, "lora_dropout": 0.0,
                  "target_modules": ["query", "value"]},
        "data": {"name": "rotten_tomatoes", "max_test_examples": test},
        "partition": {"kind": "dirichlet", "alpha": 0.5},
        "fleet": {"num_devices": devices, "participation": 1.0, "dropout": 0.0},
        "train": {"local_steps": steps, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0, "eval_batch_size": 128,
                  "threads": threads, "workers": workers},
        "method": method,
    })


# -- the plain reference loop ---------------------------------------------------------------
class Reference:
    """FedLoRA the usual way (see the module docstring); its state uses our key format to compare."""

    def __init__(self, sim: Simulation):
        from peft import LoraConfig, TaskType, get_peft_model

        cfg, w = sim.cfg, sim.work
        self.cfg, self.work, self.tok = cfg, w, sim.tokenizer
        self.layers = sorted(sim.global_ranks)
        base = load_base(cfg.model.name, w.num_classes, sim.tokenizer, cfg.run.seed)
        self.layer_path, _ = find_layers(base)
        self.model = get_peft_model(base, LoraConfig(
            task_type=TaskType.SEQ_CLS, r=cfg.model.rank, lora_alpha=cfg.model.alpha, lora_dropout=cfg.model.lora_dropout,
            target_modules=cfg.model.target_modules, layers_to_transform=self.layers))
        self.state = {k: v.clone() for k, v in sim.state.items()}  # the same global adapter to start from

    def _peft_dict(self, state: State) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in state.items():
            p = parse_key(k)
            if p is None:
                out["base_model.model." + k[len("head."):]] = v
            else:
                out[f"base_model.model.{self.layer_path}.{p[0]}.{p[1]}.lora_{p[2]}.weight"] = v
        return out

    def _state(self) -> State:
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.model)
        back = self._peft_dict({k: k for k in self.state})  # PEFT name -> our key
        return {back[k]: v.detach().clone() for k, v in sd.items()}

    def _padded(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        w, width = self.work, self.cfg.model.max_length
        b = collate([w.ids[i] for i in positions], w.labels[positions], w.pad_id)
        extra = width - b["input_ids"].shape[1]
        return {"input_ids": F.pad(b["input_ids"], (0, extra), value=w.pad_id),
                "attention_mask": F.pad(b["attention_mask"], (0, extra)), "labels": b["labels"]}

    def train_round(self, rnd: int) -> None:
        from peft import set_peft_model_state_dict

        cfg, w, seed = self.cfg, self.work, self.cfg.run.seed
        inner = self.model.base_model.model
        updates, sizes = [], []
        for d in range(cfg.fleet.num_devices):
            set_peft_model_state_dict(self.model, self._peft_dict(self.state))
            self.model.train()
            for i in range(self.layers[0]):  # frozen layers (and embeddings) run without dropout
                inner.get_submodule(self.layer_path)[i].eval()
            inner.base_model.embeddings.eval()
            opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                    lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
            torch.manual_seed(torch_seed((seed, 5005, rnd, d, 0)))
            for pick in sample_batches(w.parts[d], cfg.train.local_steps, cfg.train.batch_size, (seed, 4004, rnd, d, 0)):
                b = self._padded(pick)
                loss = F.cross_entropy(self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
                opt.zero_grad()
                loss.backward()
                opt.step()
            updates.append(self._state())
            sizes.append(len(w.parts[d]))
        total = sum(sizes)
        self.state = {k: sum(u[k] * (n / total) for u, n in zip(updates, sizes)) for k in self.state}  # FedAvg

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, self._peft_dict(self.state))
        self.model.eval()
        test, bs = self.work.test, self.cfg.train.eval_batch_size
        loss, correct = 0.0, 0
        for i in range(0, len(test), bs):
            b = self._padded(test[i:i + bs])
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
        return loss / len(test), correct / len(test)


# -- timing ----------------------------------------------------------------------------------
class TimedExecutor:
    """Wraps the engine's executor to time device jobs and sum their FLOPs."""

    def __init__(self, inner):
        self.inner, self.seconds, self.flops = inner, 0.0, 0.0

    def run(self, rnd, jobs):
        t = time.perf_counter()
        outs = self.inner.run(rnd, jobs)
        self.seconds += time.perf_counter() - t
        self.flops += sum(o.flops for o in outs if o is not None)
        return outs

    def __getattr__(self, name):  # evaluate, close: the wrapped executor's
        return getattr(self.inner, name)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def run_workload(name: str, method: dict, args) -> dict:
    cfg = config(method, args.quick, args.threads, args.workers)
    sim = Simulation(cfg)
    sim.model.dropout_width = cfg.model.max_length  # draw dropout masks as the padded reference does
    timed = TimedExecutor(sim.executor)
    sim.executor = timed
    if args.engine_only:  # for a profiler: the engine's rounds and nothing else
        t = time.perf_counter()
        for rnd in range(1, cfg.run.rounds + 1):
            row = sim.step()
            print(f"  {name} round {rnd}: engine acc {row['test_acc']:.4f} loss {row['test_loss']:.5f}", flush=True)
        print(f"  {name}: engine {time.perf_counter() - t:.1f} s (device jobs {timed.seconds:.1f} s)", flush=True)
        if hasattr(timed, "close"):
            timed.close()
        return {"speedup": float("nan"), "same": True, "job_s": timed.seconds, "job_flops": timed.flops}
    ref = Reference(sim)
    start = {k: v.clone() for k, v in sim.state.items()}
    t_eng = t_ref = 0.0
    for rnd in range(1, cfg.run.rounds + 1):  # alternate the paths round by round
        for path in (("engine", "reference") if rnd % 2 else ("reference", "engine")):
            t = time.perf_counter()
            if path == "engine":
                row = sim.step()  # trains and evaluates (eval_every = 1)
                t_eng += time.perf_counter() - t
            else:
                ref.train_round(rnd)
                ref_loss, ref_acc = ref.evaluate()
                t_ref += time.perf_counter() - t
        print(f"  {name} round {rnd}: engine acc {row['test_acc']:.4f} loss {row['test_loss']:.5f} | "
              f"reference acc {ref_acc:.4f} loss {ref_loss:.5f}", flush=True)
    # Same result = the training update agrees to float noise. Adam divides each gradient by its
    # running RMS, so summation-order noise (~1e-7) shows up at ~1e-4 of the update; a wrong mask,
    # layer or batch shows up at O(1).
    err = sum(float((sim.state[k] - ref.state[k]).norm()) ** 2 for k in start) ** 0.5
    upd = sum(float((ref.state[k] - start[k]).norm()) ** 2 for k in start) ** 0.5
    rel = err / upd
    same = (rel <= 2e-3 and abs(row["test_acc"] - ref_acc) <= 1.0 / len(sim.work.test) + 1e-12
            and abs(row["test_loss"] - ref_loss) <= 1e-4 * ref_loss)
    print(f"  {name}: engine {t_eng:.1f} s (device jobs {timed.seconds:.1f} s), reference {t_ref:.1f} s, "
          f"speedup {t_ref / t_eng:.2f}x; layers below {sim.cached_layers} cached")
    print(f"  {name}: final adapter |engine - reference| / |update| = {rel:.1e}, test acc {row['test_acc']:.4f} "
          f"vs {ref_acc:.4f}, loss {row['test_loss']:.6f} vs {ref_loss:.6f}: {'SAME' if same else 'DIFFERENT'}", flush=True)
    if hasattr(timed, "close"):
        timed.close()
    return {"speedup": t_ref / t_eng, "same": same, "job_s": timed.seconds, "job_flops": timed.flops}


def trace_workers() -> None:
    """Have each worker process print when it ran each batch of work (seconds from now), how much
    of it was first passes through the frozen layers, and the first passes it ran for another
    worker. Call before the first round: the workers are forked then, with these wrappers."""
    from hierfedlora.fast import workers

    t0, timed, lend = time.time(), workers._timed, workers._help

    def traced(model, items, work, before=None, groups=None):
        start = time.time()
        out = timed(model, items, work, before, groups)
        print(f"    worker {os.getpid()}: {start - t0:6.2f} -{time.time() - t0:6.2f} s  {len(items):2d} items, first passes "
              f"{sum(p for _, p in out[1]):.2f} s", flush=True)
        return out

    def helped(model, ids, lent):
        out = lend(model, ids, lent)
        print(f"    worker {os.getpid()}: {len(lent.keys)} first passes for worker {lent.target} in {out.seconds:.2f} s",
              flush=True)
        return out

    workers._timed, workers._help = traced, helped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 devices, 4 local steps, 256 test examples")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both paths (0 = torch's default)")
    ap.add_argument("--workloads", default="W1,W2", help="which workloads to run (default both)")
    ap.add_argument("--workers", type=int, default=0, help="the engine's train.workers (default 0: one process per core)")
    ap.add_argument("--engine-only", action="store_true",
                    help="run only the engine's rounds (no reference, no comparison): what to profile, see docs/benchmarks.md")
    ap.add_argument("--timeline", action="store_true", help="each worker prints when it was busy with what")
    args = ap.parse_args()
    if args.timeline:
        trace_workers()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak()
    workers = args.workers or os.cpu_count()
    print(f"torch {torch.__version__}; reference: {torch.get_num_threads()} torch threads; engine: train.workers = {workers} "
          f"(single-threaded worker processes{', i.e. in-process' if workers == 1 else ''}); "
          f"dense fp32 matmul peak {peak / 1e9:.1f} GFLOP/s{' (quick)' if args.quick else ''}", flush=True)
    todo = args.workloads.split(",")
    skip = {"speedup": float("nan"), "same": True, "job_s": float("nan"), "job_flops": float("nan")}
    w1 = run_workload("W1", {"name": "fedlora"}, args) if "W1" in todo else skip
    w2 = run_workload("W2", {"name": "fedlora_topk", "depth": 2}, args) if "W2" in todo else skip
    if args.engine_only:
        return 0
    peak = max(peak, matmul_peak())
    util = w1["job_flops"] / w1["job_s"] / peak
    ok = w1["same"] and w2["same"]
    print(f"results identical: {'yes' if ok else 'NO'}; W1 engine trains at {w1['job_flops'] / w1['job_s'] / 1e9:.1f} GFLOP/s")
    print(f"W1 speedup={w1['speedup']:.2f} W2 speedup={w2['speedup']:.2f} flop_util={util:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
