"""Device jobs in worker processes (`train.workers`): one single-threaded process per core.

A device's job depends only on its payload, plan and seeds (`trainer.run_job`), so jobs of one
round can run anywhere, in any order, with the same result. On a small CPU that is the cheapest
way to use every core: measured on 2 cores (docs/benchmarks.md), a MiniLM local step gains 1.45x
from a second torch thread but 2x from a second process, because its many small operations do not
split well across threads. Workers are forked from the simulator once, so they start with its
model, data and prefix cache settings; each keeps its own cache, and a device always goes to the
same worker when the load allows, so its examples are cached once.
"""

from __future__ import annotations

import multiprocessing
import pickle
import traceback
import weakref

import torch

from hierfedlora.trainer import JobOutput


def _serve(sim, conn, cache_mb: float) -> None:
    torch.set_num_threads(1)
    if sim.model.prefix is not None:
        sim.model.prefix.fork(cache_mb)  # its own cache: the parent's memory-mapped file is not ours
    from hierfedlora.engine import LocalExecutor

    local = LocalExecutor(sim)
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg is None:
            return
        try:
            reply = (True, local.run(*msg))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it
            reply = (False, traceback.format_exc())
        conn.send_bytes(pickle.dumps(reply))


def _stop(conns, procs) -> None:
    for c in conns:
        try:
            c.send_bytes(pickle.dumps(None))
        except OSError:
            pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()


class ProcessExecutor:
    """Runs a round's jobs on `workers` forked processes (Linux/macOS, CPU only)."""

    def __init__(self, sim, workers: int):
        ctx = multiprocessing.get_context("fork")
        cache_mb = sim.cfg.train.cache_memory_mb / (workers + 1)  # the parent keeps a share for evaluation
        self.conns, self.procs = [], []
        for i in range(workers):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(sim, theirs, cache_mb), daemon=True, name=f"hierfedlora-worker-{i}")
            p.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(p)
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)

    def _assign(self, devices: list[int]) -> list[int]:
        """Worker of each job: device d on worker d mod n (its cached examples live there),
        unless that worker already has more jobs than the least loaded one."""
        n = len(self.conns)
        load = [0] * n
        out = []
        for d in devices:
            w = d % n if load[d % n] <= min(load) else load.index(min(load))
            load[w] += 1
            out.append(w)
        return out

    def run(self, rnd: int, jobs: list[tuple]) -> list[JobOutput | None]:
        where = self._assign([plan.device for plan, _, _ in jobs])
        for w, conn in enumerate(self.conns):
            mine = [job for job, at in zip(jobs, where) if at == w]
            if mine:
                conn.send_bytes(pickle.dumps((rnd, mine)))
        replies = {w: pickle.loads(conn.recv_bytes()) for w, conn in enumerate(self.conns) if w in where}
        for w, (ok, res) in replies.items():
            if not ok:
                raise RuntimeError(f"device jobs failed in worker {w}:\n{res}")
        return [replies[w][1].pop(0) for w in where]

    def close(self) -> None:
        self._finalizer()
