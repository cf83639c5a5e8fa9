"""Device jobs in worker processes (`train.workers`): one single-threaded process per core.

A device's job depends only on its payload, plan and seeds (`trainer.run_job`), so jobs of one
round can run anywhere, in any order, with the same result. On a small CPU that is the cheapest
way to use every core: measured on 2 cores (docs/benchmarks.md), a MiniLM local step gains 1.45x
from a second torch thread but 2x from a second process, because its many small operations do not
split well across threads. Workers are forked from the simulator when the first round starts, so
they begin with its model, data and settings as they are then; each keeps its own prefix cache.

Jobs are placed by estimated cost (`place`): a job costs its training steps plus the first pass of
its examples that the worker has not cached yet, each at the seconds per FLOP the workers have
measured so far. A device's job goes where its last one ran (its examples are cached there) unless
moving it shortens the round, so uneven jobs (HierFedLoRA's depths and frequencies, devices with
more new examples than others) still end together. What placement cannot even out (a job is the
unit it moves) is evened out by `lend`: the less loaded worker first passes some of the other's
new examples through the frozen layers and the parent forwards the rows, which the other caches
before the job that needs them (the same numbers: an example's rows do not depend on its batch).
Work that fails in a worker raises its traceback here at once; the workers are stopped (one may be
waiting for rows that will not come) and the next round forks new ones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.connection
import pickle
import threading
import time
import traceback
import weakref

import torch

from hierfedlora.clock import step_flops
from hierfedlora.trainer import JobOutput, batch_scores, combine_scores, job_picks


def _keep_heap() -> None:
    """Ask glibc's malloc to keep freed memory (up to 256 MiB) instead of handing it back to the
    system. By default it returns the top of the heap and gives tensors above a moving threshold
    their own mapping, so a layer's ~10 MB activations often arrive as fresh pages that the kernel
    zeroes on first touch: `python benchmarks/first_pass.py` (MiniLM, one core, 64 examples through
    the 4 frozen layers) measured 340-367 ms by default and 329-336 ms with this over five runs.
    No effect on any value; a no-op where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to 256 MiB of free heap
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MiB come from the heap (fixed, not moving)


def _serve(sim, conn, cache_mb: float) -> None:
    torch.set_num_threads(1)
    _keep_heap()
    if sim.model.prefix is not None:
        sim.model.prefix.fork(cache_mb)  # its own cache: the parent's memory-mapped file is not ours
    from hierfedlora.engine import LocalExecutor

    local = LocalExecutor(sim)
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg is None:
            return
        if msg[0] == "import":  # rows for a job that failed before it could take them: drop
            continue
        try:
            if msg[0] == "train":  # ("train", rnd, jobs, needs, helps)
                _, rnd, jobs, needs, helps = msg
                for target, keys, boundary in helps:  # first: another worker waits for these
                    conn.send_bytes(pickle.dumps(_help(sim.model, sim.work.ids, target, keys, boundary)))
                got: set[int] = set()
                reply = (True, _timed(sim.model, jobs, lambda js: local.run(rnd, js),
                                      lambda i: _receive(conn, sim.model.prefix, needs[i], got), local.groups(jobs)))
            else:  # ("eval", payload, ranks, batches)
                sim.model.load(msg[1], msg[2], ())
                reply = (True, _timed(sim.model, msg[3], lambda bs: batch_scores(sim.model, bs)))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it
            reply = (False, traceback.format_exc())
        conn.send_bytes(pickle.dumps(reply))


def _help(model, ids, target: int, keys: list[int], boundary: int) -> tuple:
    """("export", target, keys, rows or None, seconds): what `target`'s cache should hold for `keys`
    (None if this worker's cache no longer has that boundary: the target then computes them)."""
    t = time.perf_counter()
    ok = model.prefix is not None and model.boundary == boundary
    rows = model.prefix_rows([ids[k] for k in keys]) if ok else None
    return ("export", target, keys, rows, time.perf_counter() - t)


def _receive(conn, cache, keys: list[int], got: set[int]) -> None:
    """Before a job: wait until the first passes of `keys`, computed by another worker and
    forwarded by the parent as ("import", keys, rows), have arrived (and are cached)."""
    while not got.issuperset(keys):
        msg = pickle.loads(conn.recv_bytes())
        if msg is None:  # the parent gave up on this round (another worker failed): stop
            raise SystemExit(0)
        _, sent, rows = msg
        got.update(sent)
        if rows is not None and cache is not None:
            for k, r in zip(sent, rows):
                if k not in cache:
                    cache.put(k, r)


def _timed(model, items: list, work, before=None, groups: list[list[int]] | None = None) -> tuple[list, list[tuple[float, float]]]:
    """work(list of items) -> their outputs, for each group of items (`groups`: indices; default
    one by one), with (seconds, of which filling the prefix cache) for each item (a group's
    shared equally: only sums over items are used); `before(i)` runs first, untimed."""
    out, secs = [None] * len(items), [(0.0, 0.0)] * len(items)
    for g in groups or [[i] for i in range(len(items))]:
        if before is not None:
            for i in g:
                before(i)
        t, p = time.perf_counter(), model.prefix_seconds
        for i, o in zip(g, work([items[i] for i in g])):
            out[i] = o
        share = ((time.perf_counter() - t) / len(g), (model.prefix_seconds - p) / len(g))
        for i in g:
            secs[i] = share
    return out, secs


def place(costs: list[list[float]], home: list[int]) -> list[int]:
    """Worker of each item, from `costs[i][w]` (estimated seconds of item i on worker w): each at
    its `home` (where its examples are cached), then, while it shortens the longest worker's time,
    the move of one item off that worker that shortens it most."""
    n = len(costs[0]) if costs else 0
    where = list(home)
    load = [0.0] * n
    for i, w in enumerate(where):
        load[w] += costs[i][w]
    while n > 1:
        top = max(range(n), key=load.__getitem__)
        best = (load[top] * (1 - 1e-9), -1, -1)
        for i in (i for i, w in enumerate(where) if w == top):
            for w in range(n):
                if w != top:
                    best = min(best, (max(load[top] - costs[i][top], load[w] + costs[i][w]), i, w))
        if best[1] < 0:
            return where
        _, i, w = best
        load[top] -= costs[i][top]
        load[w] += costs[i][w]
        where[i] = w
    return where


def lend(load: list[float], due: list[list[tuple[int, float]]], min_gap: float = 0.05) -> list[tuple[int, int, int]]:
    """Balance what `place` could not: a job cannot be split, but the first pass of one of its new
    examples can run on another worker and be sent over. `load[w]`: estimated seconds of worker w;
    `due[w]`: (example, seconds) of the first passes w is due to compute, latest needed first.
    Returns moves (example, from, to): from the longest worker to the shortest, while a move
    leaves the shortest no longer than the longest and the gap is at least `min_gap`."""
    load, nxt, moves = list(load), [0] * len(load), []
    while len(load) > 1:
        top = max(range(len(load)), key=load.__getitem__)
        low = min(range(len(load)), key=load.__getitem__)
        if nxt[top] >= len(due[top]) or load[top] - load[low] < min_gap:
            break
        key, c = due[top][nxt[top]]
        if load[low] + c > load[top] - c:
            break
        nxt[top] += 1
        load[top] -= c
        load[low] += c
        moves.append((key, top, low))
    return moves


class _Rate:
    """Seconds per FLOP of one kind of work, from what the workers measured (a prior of 50
    GFLOP/s until they have)."""

    def __init__(self):
        self.seconds, self.flops = 1e-3, 5e7

    def add(self, seconds: float, flops: float) -> None:
        if flops > 0:
            self.seconds += max(seconds, 0.0)
            self.flops += flops

    def __call__(self, flops: float) -> float:
        return flops * self.seconds / self.flops


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

    MIN_GAP = 0.05  # seconds: smaller imbalances are not worth a message

    def __init__(self, sim, workers: int):
        self.sim, self.workers = sim, workers
        self.conns, self.procs = [], []
        self.cached: list[set[int]] = [set() for _ in range(workers)]  # examples each worker has cached
        self.home: dict[int, int] = {}  # device -> the worker its last job ran on
        self.rates = {"prefix": _Rate(), "train": _Rate(), "eval": _Rate()}
        self._locks = [threading.Lock() for _ in range(workers)]
        self.lent = 0  # examples one worker passed through the frozen layers for another
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

    # -- what a piece of work costs ---------------------------------------------------------
    @property
    def _cut(self) -> int:
        """Layers below the prefix cache (0 without one)."""
        m = self.sim.model
        return m.boundary if m.prefix is not None else 0

    def _layer_flops(self, keys) -> dict[int, float]:
        """Forward FLOPs of one layer for each distinct example."""
        ids, cost = self.sim.work.ids, self.sim.model.cost
        return {int(k): cost.layer_fwd_flops(len(ids[k])) for k in keys}

    def _costs(self, firsts: list[dict[int, float]], above: list[float], kind: str) -> list[list[float]]:
        """Estimated seconds of each item on each worker: `above` (its work above the cache) plus
        the first pass of its examples (`firsts`: one layer's FLOPs per example) where not cached."""
        rate, first, cut = self.rates[kind], self.rates["prefix"], self._cut
        return [[rate(a) + first(cut * sum(f for k, f in ex.items() if k not in self.cached[w]))
                 for w in range(self.workers)] for ex, a in zip(firsts, above)]

    def _learn(self, where, firsts, above, kind, secs) -> None:
        """Book what the workers measured and which examples they now hold."""
        cut = self._cut
        for w, ex, a, (total, prefix) in zip(where, firsts, above, secs):
            new = sum(f for k, f in ex.items() if k not in self.cached[w])
            self.rates["prefix"].add(prefix, cut * new)
            self.rates[kind].add(total - prefix, a)
            self.cached[w].update(ex)

    def _due(self, where: list[int], firsts: list[dict[int, float]]) -> list[list[tuple[int, int]]]:
        """Per worker, (example, first job needing it) for the examples its jobs will have to
        pass through the frozen layers, latest needed first."""
        due: list[list[tuple[int, int]]] = []
        for w in range(self.workers):
            first: dict[int, int] = {}
            for i, at in enumerate(where):
                if at == w:
                    for k in firsts[i]:
                        if k not in self.cached[w] and k not in first:
                            first[k] = i
            due.append(sorted(first.items(), key=lambda kv: (-kv[1], kv[0])))
        return due

    def _lend(self, where: list[int], firsts: list[dict[int, float]], costs: list[list[float]]):
        """Which first passes to run on another worker (see `lend`): ([(helper, target, keys)],
        for each job the examples it must receive before it starts)."""
        needs: list[list[int]] = [[] for _ in where]
        if self._cut == 0 or self.workers < 2:
            return [], needs
        load = [0.0] * self.workers
        for i, w in enumerate(where):
            load[w] += costs[i][w]
        due = self._due(where, firsts)
        first_pass = self.rates["prefix"]
        moves = lend(load, [[(k, first_pass(self._cut * firsts[i][k])) for k, i in d] for d in due], self.MIN_GAP)
        job_of = {(w, k): i for w, d in enumerate(due) for k, i in d}
        helps: dict[tuple[int, int], list[int]] = {}
        for k, target, helper in moves:
            helps.setdefault((helper, target), []).append(k)
            needs[job_of[target, k]].append(k)
        return [(h, t, keys) for (h, t), keys in helps.items()], needs

    def _scatter(self, where: list[int], items: list, message, helps=()) -> tuple[list, list, list]:
        """Send worker w one message (message(w, indices of its items, its helps)) and collect the
        replies' items and timings, in input order, and (seconds, keys) of each help (`helps`:
        (helper, target, keys)), whose first passes are forwarded to their target as they come.
        One message per worker and forwarding from threads: the parent never blocks on a send to
        a worker that is busy or sending to it."""
        if not self.conns:
            self._start()
        owed = [0] * self.workers  # messages still to come from each worker
        for w, conn in enumerate(self.conns):
            idx = [i for i, at in enumerate(where) if at == w]
            mine = [(t, keys, self._cut) for h, t, keys in helps if h == w]
            if idx or mine:
                conn.send_bytes(pickle.dumps(message(w, idx, mine)))
                owed[w] += 1 + len(mine)
        replies, helped, forwards = {}, [], []
        try:
            while any(owed):
                for conn in multiprocessing.connection.wait([c for c, n in zip(self.conns, owed) if n]):
                    w = self.conns.index(conn)
                    msg = pickle.loads(conn.recv_bytes())
                    owed[w] -= 1
                    if msg[0] == "export":  # first passes for another worker: pass them on
                        _, target, keys, rows, seconds = msg
                        t = threading.Thread(target=self._send, args=(target, ("import", keys, rows)), daemon=True)
                        t.start()
                        forwards.append(t)
                        if rows is not None:
                            helped.append((seconds, keys))
                    elif not msg[0]:  # the others may wait for it: start afresh next time
                        self._restart()
                        raise RuntimeError(f"worker {w} failed:\n{msg[1]}")
                    else:
                        replies[w] = msg[1]
        finally:
            for t in forwards:
                t.join(timeout=60)
        out, secs = [], []
        for w in where:
            out.append(replies[w][0].pop(0))
            secs.append(replies[w][1].pop(0))
        return out, secs, helped

    def _restart(self) -> None:
        """Stop the workers now (one may be waiting for rows that will not come, another busy with
        jobs whose round is lost); the next round forks new ones, with empty caches."""
        for p in self.procs:
            p.kill()
            p.join(timeout=10)
        self.conns.clear()
        self.procs.clear()
        self.cached = [set() for _ in range(self.workers)]
        self.home.clear()

    def _send(self, w: int, msg) -> None:
        with self._locks[w]:
            try:
                self.conns[w].send_bytes(pickle.dumps(msg))
            except (OSError, IndexError):  # the round failed and the workers were stopped
                pass

    def run(self, rnd: int, jobs: list[tuple]) -> list[JobOutput | None]:
        cfg, w, m = self.sim.cfg, self.sim.work, self.sim.model
        firsts, above = [], []
        for plan, _, k in jobs:
            picks = job_picks(w.parts[plan.device], plan, seed=cfg.run.seed, rnd=rnd, call=k,
                              batch_size=cfg.train.batch_size)
            firsts.append(self._layer_flops({int(i) for p in picks for i in p}))
            # the steps' FLOPs as the clock counts them, less the layers below the cache
            above.append(sum(step_flops(m.cost, [len(w.ids[i]) for i in p], m.num_layers - self._cut,
                                        len(plan.train_layers), cfg.fleet.backward_ratio) for p in picks))
        home = [self.home.get(plan.device, plan.device % self.workers) for plan, _, _ in jobs]
        costs = self._costs(firsts, above, "train")
        where = place(costs, home)
        helps, needs = self._lend(where, firsts, costs)
        out, secs, helped = self._scatter(where, jobs, lambda at, idx, mine: (
            "train", rnd, [jobs[i] for i in idx], [needs[i] for i in idx], mine), helps)
        layer = {k: f for ex in firsts for k, f in ex.items()}
        for seconds, keys in helped:
            self.rates["prefix"].add(seconds, self._cut * sum(layer[k] for k in keys))
        self.lent += sum(len(keys) for _, keys in helped)
        for (_, target, keys) in helps:  # received, not computed there
            self.cached[target].update(keys)
        self._learn(where, firsts, above, "train", secs)
        self.home.update((plan.device, at) for (plan, _, _), at in zip(jobs, where))
        return out

    def evaluate(self, payload, ranks: dict[int, int], batches: list) -> tuple[float, float]:
        """Evaluation split by batches (placed as jobs are, so a batch stays where its examples
        are cached), summed in batch order: the same numbers as evaluating here."""
        n, above_cut = self.workers, self.sim.model.num_layers - self._cut
        firsts = [self._layer_flops(b["index"].tolist()) if "index" in b else {} for b in batches]
        above = [above_cut * sum(f.values()) for f in firsts]
        home = [i % n if (i // n) % 2 == 0 else n - 1 - i % n for i in range(len(batches))]
        where = place(self._costs(firsts, above, "eval"), home)
        scores, secs, _ = self._scatter(where, batches,
                                        lambda at, idx, _: ("eval", payload, ranks, [batches[i] for i in idx]))
        self._learn(where, firsts, above, "eval", secs)
        return combine_scores(scores)

    def close(self) -> None:
        self._finalizer()
