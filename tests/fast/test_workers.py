"""Device jobs in worker processes give the same run; placement and lending as specified; a failure
in a worker stops the round with its error."""

import subprocess
import sys
import time

import pytest
import torch

from hierfedlora.engine import Simulation
from hierfedlora.fast.model import FastModel


def test_device_jobs_in_worker_processes_give_the_same_run(tiny_cfg):
    topk = {"method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 2, "fleet.num_devices": 5, "train.threads": 1}
    here = Simulation(tiny_cfg(**topk))
    pool = Simulation(tiny_cfg(**topk, **{"train.workers": 2}))
    assert type(pool.executor).__name__ == "ProcessExecutor"
    assert here.run() == pool.run()
    assert all(torch.equal(here.state[k], pool.state[k]) for k in here.state)
    ex = pool.executor
    # every device's examples are booked on the worker its last job ran on, and each worker
    # reported time for the work it did
    assert ex.home and all(w in (0, 1) for w in ex.home.values())
    for d, w in ex.home.items():
        assert set(pool.work.parts[d].tolist()) & ex.cached[w]
    ran = set().union(*ex.cached)
    assert set(pool.work.test.tolist()) <= ran <= set(pool.work.train.tolist()) | set(pool.work.test.tolist())
    assert all(r.seconds > 1e-3 and r.flops > 5e7 for r in (ex.rates["train"], ex.rates["eval"]))
    ex.close()
    assert not any(p.is_alive() for p in ex.procs)


def test_place_keeps_items_home_unless_a_move_shortens_the_longest_worker():
    from hierfedlora.fast.workers import place

    # all at home on worker 0 (7 s against 0): moving item 0 (3 s there, 4 s on worker 1) gives 4 | 4
    assert place([[3, 4], [3, 4], [1, 1.5]], [0, 0, 0]) == [1, 0, 0]
    # a move that only evens the load without shortening the longest worker is not made
    assert place([[2, 2], [2, 2]], [0, 1]) == [0, 1]
    # cached examples make a move dear: 5 | 4 at home; item 0 away costs 3 (5 -> 2 | 7): stays
    assert place([[1, 3], [4, 5], [4, 4]], [0, 0, 1]) == [0, 0, 1]
    # three workers, one overloaded: its items spread while that shortens the round
    where = place([[2, 2, 2]] * 6, [0] * 6)
    assert sorted(where.count(w) for w in range(3)) == [2, 2, 2]
    assert place([], []) == [] and place([[1.0]], [0]) == [0]


def test_lend_moves_first_passes_from_the_longest_worker_while_that_shortens_it():
    from hierfedlora.fast.workers import lend

    # 10 s against 4: move 1 s passes from worker 0, latest needed first, until 7 | 7
    due = [[(7, 1.0), (8, 1.0), (9, 1.0), (10, 1.0)], []]
    assert lend([10.0, 4.0], due) == [(7, 0, 1), (8, 0, 1), (9, 0, 1)]
    # a pass bigger than half the gap would only swap which worker is longest: none moves
    assert lend([10.0, 8.0], [[(1, 1.5)], []]) == []
    # a gap below min_gap is left alone; nothing due, nothing moves
    assert lend([1.0, 0.99], [[(1, 0.001)], []]) == [] and lend([5.0, 0.0], [[], []]) == []
    # three workers: the longest gives to whichever is shortest at each move
    assert lend([6.0, 0.0, 1.0], [[(1, 1.0), (2, 1.0), (3, 1.0)], [], []]) == [(1, 0, 1), (2, 0, 1), (3, 0, 2)]


def test_first_passes_computed_by_another_worker_give_the_same_run(tiny_cfg, monkeypatch):
    from hierfedlora.fast import workers

    # every job on worker 0: worker 1 has nothing to train, so it passes worker 0's new examples
    # through the frozen layers and they are sent over; the run must not change by a bit
    monkeypatch.setattr(workers, "place", lambda costs, home: [0] * len(costs))
    monkeypatch.setattr(workers.ProcessExecutor, "MIN_GAP", 0.0)  # the tiny model's gaps are microseconds
    topk = {"method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 2, "fleet.num_devices": 5, "train.threads": 1}
    here = Simulation(tiny_cfg(**topk))
    pool = Simulation(tiny_cfg(**topk, **{"train.workers": 2}))
    assert here.run() == pool.run()
    assert all(torch.equal(here.state[k], pool.state[k]) for k in here.state)
    ex = pool.executor
    assert ex.lent > 0
    assert ex.rates["prefix"].flops > 5e7  # the helper's time was booked
    ex.close()


@pytest.mark.parametrize("where", ["job", "lent rows"])


def test_work_failing_in_a_worker_stops_the_round_with_its_error(tiny_cfg, monkeypatch, where):
    import time

    from hierfedlora.fast import joined, workers

    # worker 1 lends to worker 0; a job of worker 0, or the rows worker 1 computes for it, fail:
    # the error must come back at once (not a worker left waiting for rows that will not come),
    # and the workers are stopped for a fresh start
    monkeypatch.setattr(workers, "place", lambda costs, home: [0] * len(costs))
    monkeypatch.setattr(workers.ProcessExecutor, "MIN_GAP", 0.0)
    if where == "job":
        real = joined.run_jobs

        def flaky(model, jobs, rnd, settings):
            if any(job.plan.device == 4 for _, job in jobs):
                raise ValueError("device 4 broke")
            return real(model, jobs, rnd, settings)

        monkeypatch.setattr(joined, "run_jobs", flaky)
    else:
        def broken(self, ids):
            raise ValueError("device 4 broke")  # the message the test expects, whichever fails

        monkeypatch.setattr(FastModel, "prefix_rows", broken)
    topk = {"method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 1, "fleet.num_devices": 5,
            "train.threads": 1, "train.workers": 2}
    sim = Simulation(tiny_cfg(**topk))
    ex = sim.executor
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="device 4 broke"):
        sim.step()
    assert time.monotonic() - start < 60
    assert ex.conns == [] and ex.procs == [] and not ex.home


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting to be reaped has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_run_killed_by_sigkill(tiny_cfg, tmp_path):
    """kill -9 of a run leaves no worker process behind (each holds a copy of the model)."""
    from hierfedlora.config import dump_config

    dump_config(tiny_cfg(**{"train.workers": 2, "run.rounds": 1}), tmp_path / "cfg.toml")
    script = ("import sys, time\nfrom hierfedlora.config import load_config\nfrom hierfedlora.engine import Simulation\n"
              "sim = Simulation(load_config(sys.argv[1]))\nsim.step()\nprint('ready', flush=True)\ntime.sleep(600)\n")
    run = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cfg.toml")], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().strip() == "ready"
        with open(f"/proc/{run.pid}/task/{run.pid}/children") as f:
            workers = [int(p) for p in f.read().split()]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
    finally:
        run.kill()
        run.wait()
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
