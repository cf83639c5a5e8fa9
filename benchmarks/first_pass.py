"""The first pass through the frozen layers, two of its settings side by side (see docs/benchmarks.md).

W2's setting (real MiniLM, `rotten_tomatoes`, the cache below layer 4), one thread, 64 training
examples at a time, as a worker runs them:

- **heap**: `LocalModel.prefix_rows` for 64 examples (embeddings and the four frozen layers) in a
  fresh process with glibc's default malloc settings, and in one that first calls
  `parallel._keep_heap`, as the workers do. Two processes of each, alternating; the better of each.
- **attention**: one frozen layer's attention for the same 64 examples, without gradients, by the
  gather `PackedEncoder.attention` uses there (`Pack.head_rows`) and by the row gather it uses
  with gradients (`_attention_rows`); then forward and backward of both, with gradients. Both
  give the same bits.

    python benchmarks/first_pass.py
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import torch

from hierfedlora import packed
from hierfedlora.data import collate
from hierfedlora.engine import Simulation
from speed import config

EXAMPLES, REPEATS = 64, 20


def setup():
    torch.set_num_threads(1)
    sim = Simulation(config({"name": "fedlora_topk", "depth": 2}, False, 1, 1))
    w = sim.work
    picks = np.random.default_rng(0).choice(w.train, EXAMPLES, replace=False)
    return sim, w, picks


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
    if keep:
        from hierfedlora.parallel import _keep_heap

        _keep_heap()
    sim, w, picks = setup()
    ids = [w.ids[k] for k in picks]
    print(f"{mean(lambda: sim.model.prefix_rows(ids)) * 1e3:.1f}")


def attention() -> None:
    from hierfedlora.parallel import _keep_heap

    _keep_heap()  # as in the workers
    sim, w, picks = setup()
    m = sim.model
    m.eval_mode()
    pk = packed.make_pack(collate([w.ids[k] for k in picks], w.labels[picks], w.pad_id)["attention_mask"])
    att = m.packed.layers[0].attention.self
    T, H, d = len(pk.rows), att.num_attention_heads, att.attention_head_size
    q, k, v = (torch.randn(T, H * d) for _ in range(3))
    enc = m.packed
    with torch.no_grad():
        gather = mean(lambda: enc.attention(q, k, v, att, pk))
        rows = mean(lambda: enc._attention_rows(q, k, v, att, pk, None, [bk.width for bk in pk.buckets], False))
        same = torch.equal(enc.attention(q, k, v, att, pk),
                           enc._attention_rows(q, k, v, att, pk, None, [bk.width for bk in pk.buckets], False))
    print(f"attention, no gradients:  gather {gather * 1e3:.2f} ms  rows {rows * 1e3:.2f} ms  "
          f"({'same' if same else 'DIFFERENT'} values)")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn(T, H * d)

    def with_grad(fn):
        def step():
            out = fn(qg, kg, vg)
            out.backward(grad)
        return step

    # the gather path, forced under autograd: what training would pay for it
    def gathered(a, b, c):
        kv_rows, q_rows, out_rows = pk.head_rows(H, False)
        sizes = [len(bk.members) * H * bk.width for bk in pk.buckets]
        ks, vs = (t.reshape(-1, d).index_select(0, kv_rows).split(sizes) for t in (b, c))
        qs = a.reshape(-1, d).index_select(0, q_rows).split(sizes)
        out = [(enc._weights(qb.view(len(bk.members), H, -1, d), kb.view(len(bk.members), H, bk.width, d), att, bk,
                             None, 0) @ vb.view(len(bk.members), H, bk.width, d)).view(-1, d)
               for bk, qb, kb, vb in zip(pk.buckets, qs, ks, vs)]
        return torch.cat(out).index_select(0, out_rows).view(-1, H * d)

    g = mean(with_grad(gathered))
    r = mean(with_grad(lambda a, b, c: enc._attention_rows(a, b, c, att, pk, None, [bk.width for bk in pk.buckets],
                                                             False)))
    print(f"attention, forward+backward: gather {g * 1e3:.2f} ms  rows {r * 1e3:.2f} ms")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--heap-default", "--heap-kept"):
        heap_child(sys.argv[1] == "--heap-kept")
        return 0
    times = {"default": [], "kept": []}
    for _ in range(2):
        for name in times:
            out = subprocess.run([sys.executable, __file__, f"--heap-{name}"], capture_output=True, text=True, check=True)
            times[name].append(float(out.stdout.strip().splitlines()[-1]))
    d, k = min(times["default"]), min(times["kept"])
    print(f"first pass, {EXAMPLES} examples, 4 frozen layers: default malloc {d:.1f} ms  heap kept {k:.1f} ms  "
          f"({(d - k) / d * 100:.1f}% less)")
    attention()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
