"""Device jobs in worker processes (`train.workers`): one single-threaded process per core.

A device's job depends only on its payload, plan and seeds (`device.train.run_job`), so jobs of one
round can run anywhere, in any order, with the same result. On a small CPU that is the cheapest
way to use every core: a MiniLM local step gains less from a second torch thread than from a second
process (docs/benchmarks.md, "worker processes"), because its many small operations do not split
well across threads. Workers are forked from the simulator when the first round starts, so they
begin with its model, data and settings (`WorkerSetup`) as they are then; each keeps its own prefix
cache and runs its jobs with `fast.joined.JoinedExecutor`.

Jobs are placed by estimated cost (`place`): a job costs its training steps plus the first pass of
its examples that the worker has not cached yet, each at the seconds per FLOP the workers have
measured so far. A device's job goes where its last one ran (its examples are cached there) unless
moving it shortens the round, so uneven jobs (HierFedLoRA's depths and frequencies, devices with
more new examples than others) still end together. What placement cannot even out (a job is the
unit it moves) is evened out by `lend`: the less loaded worker first passes some of the other's
new examples through the frozen layers and the parent forwards the rows, which the other caches
before the job that needs them (the same numbers: an example's rows do not depend on its batch).
Work that fails in a worker raises its traceback here at once; the workers are stopped (one may be
waiting for rows that will not come) and the next round forks new ones. Parent and workers talk in
the typed messages below (`TrainRequest`, `EvalRequest`, `ExportedRows`, `ImportedRows`, `Reply`,
`Failure`, `Stop`), pickled over a pipe each.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hierfedlora.clock import step_flops
from hierfedlora.device.train import FleetData, batch_scores, combine_scores, job_picks
from hierfedlora.fast.joined import JoinedExecutor
from hierfedlora.fast.model import FastModel
from hierfedlora.lora_state import State
from hierfedlora.protocol import DeviceJob, ExecutorBase, JobOutput, LocalTraining, Scores


@dataclass(frozen=True)
class WorkerSetup:
    """What the workers start from (forked with it): the model, every device's data, the local
    training settings and the memory the prefix caches may use, all workers together."""

    model: FastModel
    data: FleetData
    settings: LocalTraining
    cache_memory_mb: float


# -- the messages between the parent and a worker ----------------------------------------------
@dataclass(frozen=True)
class Lend:
    """Compute the first passes of `keys` for worker `target` (whose cache reads `cached_layers`)."""

    target: int
    keys: list[int]
    cached_layers: int


@dataclass(frozen=True)
class TrainRequest:
    """Run these jobs of round `rnd`; before job i, wait for the rows of `needs[i]` (lent by another
    worker); first of all, compute the first passes in `lends` for others."""

    rnd: int
    jobs: list[DeviceJob]
    needs: list[list[int]]
    lends: list[Lend]


@dataclass(frozen=True)
class EvalRequest:
    """Score these batches with this payload (`batch_scores`)."""

    payload: State
    ranks: dict[int, int]
    batches: list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ExportedRows:
    """Worker -> parent: first passes computed for worker `target` (rows None: this worker's cache
    no longer reads those layers, so the target computes them itself)."""

    target: int
    keys: list[int]
    rows: list[np.ndarray] | None
    seconds: float


@dataclass(frozen=True)
class ImportedRows:
    """Parent -> worker: first passes another worker computed for this one's jobs."""

    keys: list[int]
    rows: list[np.ndarray] | None


@dataclass(frozen=True)
class Reply:
    """Worker -> parent: the request's outputs and, per item, (seconds, of which filling the cache)."""

    outputs: list[Any]
    seconds: list[tuple[float, float]]


@dataclass(frozen=True)
class Failure:
    """Worker -> parent: the request failed with this traceback."""

    traceback: str


@dataclass(frozen=True)
class Stop:
    """Parent -> worker: stop (also: give up waiting for rows, the round is lost)."""


def _send(conn, msg) -> None:
    conn.send_bytes(pickle.dumps(msg))


def _recv(conn):
    return pickle.loads(conn.recv_bytes())


def _keep_heap() -> None:
    """Ask glibc's malloc to keep freed memory (up to 256 MiB) instead of handing it back to the
    system. By default it returns the top of the heap and gives tensors above a moving threshold
    their own mapping, so a layer's ~10 MB activations often arrive as fresh pages that the kernel
    zeroes on first touch; `python benchmarks/first_pass.py` measures the first pass with and
    without this (docs/benchmarks.md). No effect on any value; a no-op where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to 256 MiB of free heap
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MiB come from the heap (fixed, not moving)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies (Linux `PR_SET_PDEATHSIG`), so that a
    run killed with SIGKILL leaves no worker holding its memory; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _serve(setup: WorkerSetup, conn, cache_mb: float, parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)
    _keep_heap()
    model = setup.model
    if model.prefix is not None:
        model.prefix.store.fork(cache_mb)  # its own cache: the parent's memory-mapped file is not ours
    local = JoinedExecutor(model, setup.data, setup.settings)
    while True:
        msg = _recv(conn)
        if isinstance(msg, Stop):
            return
        if isinstance(msg, ImportedRows):  # rows for a job that failed before it could take them: drop
            continue
        try:
            if isinstance(msg, TrainRequest):
                for lent in msg.lends:  # first: another worker waits for these
                    _send(conn, _help(model, setup.data.ids, lent))
                got: set[int] = set()
                rnd, needs = msg.rnd, msg.needs
                reply = Reply(*_timed(model, msg.jobs, lambda js: local.run(rnd, js),
                                      lambda i: _receive(conn, model, needs[i], got), local.groups(msg.jobs)))
            else:
                model.load(msg.payload, msg.ranks, ())
                reply = Reply(*_timed(model, msg.batches, lambda bs: batch_scores(model, bs)))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it
            reply = Failure(traceback.format_exc())
        _send(conn, reply)


def _help(model: FastModel, ids, lent: Lend) -> ExportedRows:
    """What `lent.target`'s cache should hold for `lent.keys` (rows None if this worker's cache no
    longer reads those layers: the target then computes them)."""
    t = time.perf_counter()
    ok = model.prefix is not None and model.cached_layers == lent.cached_layers
    rows = model.prefix_rows([ids[k] for k in lent.keys]) if ok else None
    return ExportedRows(lent.target, lent.keys, rows, time.perf_counter() - t)


def _receive(conn, model: FastModel, keys: list[int], got: set[int]) -> None:
    """Before a job: wait until the first passes of `keys`, computed by another worker and
    forwarded by the parent (`ImportedRows`), have arrived (and are cached)."""
    while not got.issuperset(keys):
        msg = _recv(conn)
        if isinstance(msg, Stop):  # the parent gave up on this round (another worker failed): stop
            raise SystemExit(0)
        got.update(msg.keys)
        if msg.rows is not None and model.prefix is not None:
            model.prefix.take(msg.keys, msg.rows)


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
            _send(c, Stop())
        except OSError:
            pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()


class ProcessExecutor(ExecutorBase):
    """Runs a round's jobs on `workers` forked processes (Linux/macOS, CPU only)."""

    MIN_GAP = 0.05  # seconds: smaller imbalances are not worth a message

    def __init__(self, setup: WorkerSetup, workers: int):
        self.setup, self.workers = setup, workers
        self.conns, self.procs = [], []
        self.cached: list[set[int]] = [set() for _ in range(workers)]  # examples each worker has cached
        self.home: dict[int, int] = {}  # device -> the worker its last job ran on
        self.rates = {"prefix": _Rate(), "train": _Rate(), "eval": _Rate()}
        self._locks = [threading.Lock() for _ in range(workers)]
        self.lent = 0  # examples one worker passed through the frozen layers for another
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        cache_mb = self.setup.cache_memory_mb / self.workers  # evaluation runs in the workers too
        for i in range(self.workers):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(self.setup, theirs, cache_mb, os.getpid()), daemon=True, name=f"hierfedlora-worker-{i}")
            p.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(p)

    # -- what a piece of work costs ---------------------------------------------------------
    @property
    def cached_layers(self) -> int:
        """Layers the prefix cache serves (0 without one)."""
        return self.setup.model.cached_layers

    def _example_flops(self, keys) -> dict[int, float]:
        """Forward FLOPs of one layer for each distinct example."""
        ids, cost = self.setup.data.ids, self.setup.model.cost
        return {int(k): cost.layer_fwd_flops(len(ids[k])) for k in keys}

    def _costs(self, example_flops: list[dict[int, float]], above: list[float], kind: str) -> list[list[float]]:
        """Estimated seconds of each item on each worker: `above` (its work above the cache) plus
        the first pass of its examples (`example_flops`: one layer's FLOPs per example) where not
        cached."""
        rate, first, cut = self.rates[kind], self.rates["prefix"], self.cached_layers
        return [[rate(a) + first(cut * sum(f for k, f in ex.items() if k not in self.cached[w]))
                 for w in range(self.workers)] for ex, a in zip(example_flops, above)]

    def _learn(self, where, example_flops, above, kind, secs) -> None:
        """Book what the workers measured and which examples they now hold."""
        cut = self.cached_layers
        for w, ex, a, (total, prefix) in zip(where, example_flops, above, secs):
            new = sum(f for k, f in ex.items() if k not in self.cached[w])
            self.rates["prefix"].add(prefix, cut * new)
            self.rates[kind].add(total - prefix, a)
            self.cached[w].update(ex)

    def _due(self, where: list[int], example_flops: list[dict[int, float]]) -> list[list[tuple[int, int]]]:
        """Per worker, (example, first job needing it) for the examples its jobs will have to
        pass through the frozen layers, latest needed first."""
        due: list[list[tuple[int, int]]] = []
        for w in range(self.workers):
            first: dict[int, int] = {}
            for i, at in enumerate(where):
                if at == w:
                    for k in example_flops[i]:
                        if k not in self.cached[w] and k not in first:
                            first[k] = i
            due.append(sorted(first.items(), key=lambda kv: (-kv[1], kv[0])))
        return due

    def _lend(self, where: list[int], example_flops: list[dict[int, float]], costs: list[list[float]]):
        """Which first passes to run on another worker (see `lend`): ([(helper, target, keys)],
        for each job the examples it must receive before it starts)."""
        needs: list[list[int]] = [[] for _ in where]
        cut = self.cached_layers
        if cut == 0 or self.workers < 2:
            return [], needs
        load = [0.0] * self.workers
        for i, w in enumerate(where):
            load[w] += costs[i][w]
        due = self._due(where, example_flops)
        first_pass = self.rates["prefix"]
        moves = lend(load, [[(k, first_pass(cut * example_flops[i][k])) for k, i in d] for d in due], self.MIN_GAP)
        job_of = {(w, k): i for w, d in enumerate(due) for k, i in d}
        helps: dict[tuple[int, int], list[int]] = {}
        for k, target, helper in moves:
            helps.setdefault((helper, target), []).append(k)
            needs[job_of[target, k]].append(k)
        return [(h, t, keys) for (h, t), keys in helps.items()], needs

    def _scatter(self, where: list[int], message, helps=()) -> tuple[list, list, list]:
        """Send worker w one request (message(indices of its items, its `Lend`s)) and collect the
        replies' items and timings, in input order, and (seconds, keys) of each help (`helps`:
        (helper, target, keys)), whose first passes are forwarded to their target as they come.
        One message per worker and forwarding from threads: the parent never blocks on a send to
        a worker that is busy or sending to it."""
        if not self.conns:
            self._start()
        owed = [0] * self.workers  # messages still to come from each worker
        for w, conn in enumerate(self.conns):
            idx = [i for i, at in enumerate(where) if at == w]
            mine = [Lend(t, keys, self.cached_layers) for h, t, keys in helps if h == w]
            if idx or mine:
                _send(conn, message(idx, mine))
                owed[w] += 1 + len(mine)
        replies, helped, forwards = {}, [], []
        try:
            while any(owed):
                for conn in multiprocessing.connection.wait([c for c, n in zip(self.conns, owed) if n]):
                    w = self.conns.index(conn)
                    msg = _recv(conn)
                    owed[w] -= 1
                    if isinstance(msg, ExportedRows):  # first passes for another worker: pass them on
                        t = threading.Thread(target=self._forward, args=(msg.target, ImportedRows(msg.keys, msg.rows)),
                                             daemon=True)
                        t.start()
                        forwards.append(t)
                        if msg.rows is not None:
                            helped.append((msg.seconds, msg.keys))
                    elif isinstance(msg, Failure):  # the others may wait for it: start afresh next time
                        self._restart()
                        raise RuntimeError(f"worker {w} failed:\n{msg.traceback}")
                    else:
                        replies[w] = msg
        finally:
            for t in forwards:
                t.join(timeout=60)
        out, secs = [], []
        for w in where:
            out.append(replies[w].outputs.pop(0))
            secs.append(replies[w].seconds.pop(0))
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

    def _forward(self, w: int, msg: ImportedRows) -> None:
        with self._locks[w]:
            try:
                _send(self.conns[w], msg)
            except (OSError, IndexError):  # the round failed and the workers were stopped
                pass

    def run(self, rnd: int, jobs: list[DeviceJob]) -> list[JobOutput | None]:
        s, m, cut = self.setup.settings, self.setup.model, self.cached_layers
        ids, parts = self.setup.data.ids, self.setup.data.parts
        example_flops, above = [], []
        for plan, _, k in jobs:
            picks = job_picks(parts[plan.device], plan, seed=s.seed, rnd=rnd, call=k, batch_size=s.batch_size)
            example_flops.append(self._example_flops({int(i) for p in picks for i in p}))
            # the steps' FLOPs as the clock counts them, less the layers below the cache
            above.append(sum(step_flops(m.cost, [len(ids[i]) for i in p], m.num_layers - cut,
                                        len(plan.train_layers), s.backward_ratio) for p in picks))
        home = [self.home.get(plan.device, plan.device % self.workers) for plan, _, _ in jobs]
        costs = self._costs(example_flops, above, "train")
        where = place(costs, home)
        helps, needs = self._lend(where, example_flops, costs)
        out, secs, helped = self._scatter(where, lambda idx, mine: TrainRequest(
            rnd, [jobs[i] for i in idx], [needs[i] for i in idx], mine), helps)
        layer = {k: f for ex in example_flops for k, f in ex.items()}
        for seconds, keys in helped:
            self.rates["prefix"].add(seconds, cut * sum(layer[k] for k in keys))
        self.lent += sum(len(keys) for _, keys in helped)
        for (_, target, keys) in helps:  # received, not computed there
            self.cached[target].update(keys)
        self._learn(where, example_flops, above, "train", secs)
        self.home.update((plan.device, at) for (plan, _, _), at in zip(jobs, where))
        return out

    def evaluate(self, payload: State, ranks: dict[int, int], batches: list) -> Scores:
        """Evaluation split by batches (placed as jobs are, so a batch stays where its examples
        are cached), summed in batch order: the same numbers as evaluating here."""
        n, above_cut = self.workers, self.setup.model.num_layers - self.cached_layers
        example_flops = [self._example_flops(b["index"].tolist()) if "index" in b else {} for b in batches]
        above = [above_cut * sum(f.values()) for f in example_flops]
        home = [i % n if (i // n) % 2 == 0 else n - 1 - i % n for i in range(len(batches))]
        where = place(self._costs(example_flops, above, "eval"), home)
        scores, secs, _ = self._scatter(where, lambda idx, _: EvalRequest(payload, ranks, [batches[i] for i in idx]))
        self._learn(where, example_flops, above, "eval", secs)
        return combine_scores(scores)

    def close(self) -> None:
        self._finalizer()
