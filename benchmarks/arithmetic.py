"""How much arithmetic each path of `benchmarks/speed.py` must do on W2 (see docs/benchmarks.md).

Counts, from the real token lengths of the benchmark's own batches (same config, seeds and
`sample_batches`), the FLOPs of the linear maps of MiniLM's layers (attention scores left out: at
~27 tokens they are a few per cent) in the engine and in the padded reference loop, and the time
each would take at a given matmul rate. It runs no model; it answers "how fast could the engine be
at best on this workload", which bounds the W2 speedup.

    python benchmarks/arithmetic.py              # W2 at 42 GFLOP/s per core, 2 cores
    python benchmarks/arithmetic.py --gflops 40 --cores 2

Counting rules (per token, per layer, one layer's linear maps = 2·(4h² + 2h·f) FLOPs):
- engine: the cached layers (below the lowest trained one) run once per example, the first time it is seen (training
  or test); the lowest trained layer runs forward and backward (backward of a LoRA layer without
  weight gradients ~ one more forward); the top layer computes keys and values for every token and
  the rest for the first token only; each evaluation runs the trained layers on the test split.
- reference: every example padded to max_length, all layers forward, the trained layers backward;
  each evaluation runs all layers on the padded test split.
"""

from __future__ import annotations

import argparse

import numpy as np

from speed import config

from hierfedlora.engine import build_workload
from hierfedlora.device.model import load_tokenizer
from hierfedlora.device.train import sample_batches


def count(depth: int = 2, hidden: int = 384, inter: int = 1536, layers: int = 6) -> dict[str, float]:
    cfg = config({"name": "fedlora_topk", "depth": depth}, False, 0, 1)
    w = build_workload(cfg, load_tokenizer(cfg.model.name))
    length = np.array([len(x) for x in w.ids])
    per_layer = 2 * (4 * hidden * hidden + 2 * hidden * inter)  # FLOPs per token per layer
    kv = 2 * (2 * hidden * hidden)  # keys and values only
    frozen = layers - depth
    seen: set[int] = set()
    tokens = new_tokens = examples = 0
    for rnd in range(1, cfg.run.rounds + 1):
        for d in range(cfg.fleet.num_devices):
            for pick in sample_batches(w.parts[d], cfg.train.local_steps, cfg.train.batch_size, (cfg.run.seed, 4004, rnd, d, 0)):
                for i in pick.tolist():
                    tokens += length[i]
                    examples += 1
                    if i not in seen:
                        seen.add(i)
                        new_tokens += length[i]
    test_tokens = int(length[w.test].sum())
    evals = cfg.run.rounds
    width = cfg.model.max_length
    engine = {
        "frozen layers, first sight": (new_tokens + test_tokens) * frozen * per_layer,
        "trained layers": 2 * (tokens * (depth - 1) * per_layer + tokens * kv + examples * per_layer),
        "evaluation above the cache": evals * (test_tokens * ((depth - 1) * per_layer + kv) + len(w.test) * per_layer),
    }
    reference = {
        "training, padded": examples * width * (layers + depth) * per_layer,
        "evaluation, padded": evals * len(w.test) * width * layers * per_layer,
    }
    return {"examples": examples, "unique": len(seen), "tokens": tokens, "new_tokens": new_tokens,
            "test_tokens": test_tokens, "engine": engine, "reference": reference}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=2, help="trained top layers (W2: 2)")
    ap.add_argument("--gflops", type=float, default=42.0, help="dense matmul rate of one core, GFLOP/s")
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    c = count(args.depth)
    print(f"training examples {c['examples']} ({c['unique']} distinct), tokens {c['tokens']} "
          f"({c['new_tokens']} first seen), test tokens {c['test_tokens']}")
    rate = args.gflops * 1e9 * args.cores
    totals = {}
    for path in ("engine", "reference"):
        for what, flops in c[path].items():
            print(f"  {path:9s} {what:28s} {flops / 1e12:6.2f} TFLOP")
        totals[path] = sum(c[path].values())
        print(f"  {path:9s} {'total':28s} {totals[path] / 1e12:6.2f} TFLOP = {totals[path] / rate:6.1f} s at {rate / 1e9:.0f} GFLOP/s")
    print(f"arithmetic ratio reference/engine = {totals['reference'] / totals['engine']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
