"""Device jobs in worker processes (`train.workers`): one single-threaded process per core.

A device's job depends only on its payload, plan and seeds (`trainer.run_job`), so jobs of one
round can run anywhere, in any order, with the same result. On a small CPU that is the cheapest
way to use every core: measured on 2 cores (docs/benchmarks.md), a MiniLM local step gains 1.45x
from a second torch thread but 2x from a second process, because its many small operations do not
split well across threads. Workers are forked from the simulator when the first round starts, so
they begin with its model, data and settings as they are then; each keeps its own prefix cache, and
a device always goes to the same worker when the load allows, so its examples are cached once.
"""

from __future__ import annotations

import multiprocessing
import pickle
import traceback
import weakref

import torch

from hierfedlora.trainer import JobOutput, batch_scores, combine_scores


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
            if msg[0] == "train":
                reply = (True, local.run(*msg[1:]))
            else:  # ("eval", payload, ranks, batches)
                sim.model.load(msg[1], msg[2], ())
                reply = (True, batch_scores(sim.model, msg[3]))
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
        self.sim, self.workers = sim, workers
        self.conns, self.procs = [], []
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        cache_mb = self.sim.cfg.train.cache_memory_mb / self.workers  # evaluation runs in the workers too
        for i in range(self.workers):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(self.sim, theirs, cache_mb), daemon=True, name=f"hierfedlora-worker-{i}")
            p.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(p)

    def _assign(self, devices: list[int]) -> list[int]:
        """Worker of each job: device d on worker d mod n (its cached examples live there),
        unless that worker already has more jobs than the least loaded one."""
        n = self.workers
        load = [0] * n
        out = []
        for d in devices:
            w = d % n if load[d % n] <= min(load) else load.index(min(load))
            load[w] += 1
            out.append(w)
        return out

    def _scatter(self, where: list[int], items: list, message) -> list:
        """Send worker w its items (message(items)); return the replies' items in input order."""
        if not self.conns:
            self._start()
        for w, conn in enumerate(self.conns):
            mine = [x for x, at in zip(items, where) if at == w]
            if mine:
                conn.send_bytes(pickle.dumps(message(mine)))
        replies = {w: pickle.loads(conn.recv_bytes()) for w, conn in enumerate(self.conns) if w in where}
        for w, (ok, res) in replies.items():
            if not ok:
                raise RuntimeError(f"worker {w} failed:\n{res}")
        return [replies[w][1].pop(0) for w in where]

    def run(self, rnd: int, jobs: list[tuple]) -> list[JobOutput | None]:
        where = self._assign([plan.device for plan, _, _ in jobs])
        return self._scatter(where, jobs, lambda mine: ("train", rnd, mine))

    def evaluate(self, payload, ranks: dict[int, int], batches: list) -> tuple[float, float]:
        """Evaluation split by batches, summed in batch order: the same numbers as evaluating here.
        Batch i always goes to the same worker (its examples are cached there), dealt 0,1,..,n-1,
        n-1,..,0, 0,1,..: batches come sorted by length, so each worker gets a fair share of tokens."""
        n = self.workers
        where = [i % n if (i // n) % 2 == 0 else n - 1 - i % n for i in range(len(batches))]
        return combine_scores(self._scatter(where, batches, lambda mine: ("eval", payload, ranks, mine)))

    def close(self) -> None:
        self._finalizer()
