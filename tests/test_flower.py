"""Flower deployment (hierfedlora.flower): same results as the in-process engine, faults, TLS.

Two layers of tests:
- in-process, through `LoopbackGrid` (a stand-in Grid that hands each message to our ClientApp in
  this process, with a Context per node): the wire format, the executor's node mapping, held copies
  for ``download="trained"``, resends and failures, for any strategy — fast;
- real processes on 127.0.0.1 (`LocalFederation`: flower-superlink + flower-supernode per device,
  `flwr run`): the same final metrics as the engine for FedLoRA (over TLS with SuperNode
  authentication) and HierFedLoRA, and a SuperNode killed mid-run. Every process a test starts is
  stopped in a finaliser, pass or fail. Deselect them with ``-m "not flower_processes"``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

import tomli_w  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from hierfedlora.aggregate import slot_average  # noqa: E402
from hierfedlora.cli import main  # noqa: E402
from hierfedlora.experiment import run_experiment  # noqa: E402
from hierfedlora.config import dump_config  # noqa: E402
from hierfedlora.engine import LocalExecutor, Simulation  # noqa: E402
from hierfedlora.flower import client_app  # noqa: E402
from hierfedlora.flower import messages as wire  # noqa: E402
from hierfedlora.flower.deploy import LocalFederation  # noqa: E402
from hierfedlora.flower.executor import FlowerExecutor  # noqa: E402
from hierfedlora.strategies import registry  # noqa: E402
from hierfedlora.protocol import DevicePlan, Job, RoundReport  # noqa: E402
from hierfedlora.strategies.base import StrategyBase, weighted_loss  # noqa: E402


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- an in-process Grid ----------------------------------------------------------------------
@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages take their sender's run and node ids from the process's task identity, which
    Flower sets in a ServerApp process; the in-process tests play that process."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class LoopbackGrid:
    """Delivers each message to `client_app.app` in this process; one Context per node.

    `silent` devices never answer (a dead or hung node), `crash` devices raise inside the ClientApp
    (Flower turns that into an error reply), `forget` devices lose their context state after each
    message (a restarted process with no memory)."""

    def __init__(self, partitions: list[int], silent=(), crash=(), forget=()):
        self.contexts = {1000 + p: Context(run_id=1, node_id=1000 + p, node_config={"partition-id": p},
                                           state=RecordDict(), run_config={}) for p in partitions}
        self.silent, self.crash, self.forget = set(silent), set(crash), set(forget)
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(m)
            nid = m.metadata.dst_node_id
            ctx = self.contexts[nid]
            p = int(ctx.node_config["partition-id"])
            if p in self.silent and m.metadata.message_type == wire.TRAIN:
                continue
            try:
                if p in self.crash and m.metadata.message_type == wire.TRAIN:
                    raise RuntimeError("device crashed")
                r = client_app.app(m, ctx)
            except Exception as e:  # noqa: BLE001 - as Flower's ClientApp runner does
                r = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            if p in self.forget:
                ctx.state = RecordDict({k: v for k, v in ctx.state.items() if k != client_app.HELD})
            replies.append(r)
        return replies


def _flower_sim(cfg, tmp_path, grid, **kw):
    out = tmp_path / "flower"
    out.mkdir(exist_ok=True)
    def executor(sim):
        return FlowerExecutor(grid, cfg, out, LocalExecutor(sim), round_timeout=5, node_wait=0, query_timeout=5,
                              log=lambda *_: None, **kw)

    return Simulation(cfg, out, executor=executor), out


def _same_rows(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb), (ra, rb)
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                assert math.isclose(va, vb, rel_tol=tol, abs_tol=tol), (k, ra["round"], va, vb)
            else:
                assert va == vb, (k, ra["round"], va, vb)


# -- a strategy with HierFedLoRA's and LEGEND's message patterns ------------------------------
class TwoTierSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tau: int = 2


class TwoTier(StrategyBase):
    """Two groups; group k trains the top k+1 layers, each device at its own ranks there (rising
    toward the output, as LEGEND's); `tau` intra-group rounds over the LAN, the later ones
    downloading only the trained layers and head (HierFedLoRA's), then a global average."""

    def __init__(self, settings: TwoTierSettings, setup):
        self.tau, self.setup, self.L = settings.tau, setup, setup.layout.num_layers

    def global_ranks(self):
        return {l: self.setup.rank for l in range(self.L)}

    def plan(self, d: int, k: int, t: int) -> DevicePlan:
        R, L = self.setup.rank, self.L
        train = tuple(range(L - 1 - k, L))
        ranks = {l: (max(1, R - (L - 1 - l) - d % 2) if l in train else R) for l in range(L)}
        return DevicePlan(d, ranks, train, self.setup.local_steps, link="lan", download="all" if t == 0 else "trained")

    def run_round(self, rnd, state, ctx):
        groups = [g for g in (ctx.available[0::2], ctx.available[1::2]) if g]
        states, weights, results, time_s = [], [], [], 0.0
        for k, g in enumerate(groups):
            gstate, gtime = state, 0.0
            for t in range(self.tau):
                res = ctx.train([Job(self.plan(d, k, t), gstate) for d in g])
                if res:
                    gstate = slot_average(gstate, [r.update for r in res], [r.num_examples for r in res])
                    gtime += max(r.time_s for r in res)
                results += res
            states.append(gstate)
            weights.append(sum(self.setup.num_examples[d] for d in g))
            time_s = max(time_s, gtime)
        if not results:
            return state, RoundReport(0.0, float("nan"), [])
        new = slot_average(state, states, weights)
        return new, RoundReport(time_s, weighted_loss(results), sorted({r.device for r in results}),
                                extra={"calls": len(groups) * self.tau})

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d):
        pass


@pytest.fixture
def two_tier(monkeypatch):
    entries = dict(registry.available())
    entries["twotier"] = registry.StrategyEntry("twotier", TwoTierSettings, TwoTier, __name__, {})
    monkeypatch.setattr(registry, "available", lambda: entries)


# -- in-process tests ------------------------------------------------------------------------
def test_plan_and_state_survive_the_wire():
    plan = DevicePlan(3, {1: 2, 2: 4, 3: 4}, (2, 3), 5, link="lan", download="trained", options={"prune": 0.1})
    rec = wire.plan_record(plan, rnd=7, call=2, tag="t", base_tag="b")
    assert wire.plan_from_record(rec) == (plan, 7, 2)
    state = {"2.query.A": torch.randn(4, 8), "2.query.B": torch.randn(8, 4), "head.classifier.bias": torch.randn(2)}
    back = wire.record_to_state(wire.state_to_record(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert wire.tensor_bytes(wire.state_to_record(state)) == (32 + 32 + 2) * 4


def test_flower_executor_reproduces_the_engine(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 3})
    local = Simulation(cfg).run()
    grid = LoopbackGrid([0, 1, 2])
    sim, out = _flower_sim(cfg, tmp_path, grid)
    _same_rows(local, sim.run(), tol=1e-6)
    traffic = read_jsonl(out / "flower_traffic.jsonl")
    assert len(traffic) == 2 * 3 and all(r["status"] == "ok" for r in traffic)
    # the tensors Flower carried are exactly what the meter booked (float32 = bytes_per_param 4)
    assert all(r["flower_down_tensor"] == r["meter_down"] and r["flower_up_tensor"] == r["meter_up"] for r in traffic)
    assert all(r["flower_down_wire"] > r["flower_down_tensor"] for r in traffic)  # npy headers, names, plan
    events = read_jsonl(out / "flower_nodes.jsonl")
    assert {e["device"]: e["node_id"] for e in events if e["event"] == "joined"} == {0: 1000, 1: 1001, 2: 1002}


@pytest.mark.parametrize("method", sorted(registry.available()))
def test_every_registered_strategy_runs_unchanged_through_flower(tiny_cfg, tmp_path, method):
    """Any strategy module (LEGEND's per-device depths and ranks, HierFedLoRA's intra-group rounds,
    HetLoRA's regulariser option, ...) gives the engine's results when its devices are SuperNodes."""
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 4, "method.name": method})
    local = Simulation(cfg).run()
    sim, out = _flower_sim(cfg, tmp_path, LoopbackGrid([0, 1, 2, 3]))
    _same_rows(local, sim.run(), tol=1e-6)
    traffic = read_jsonl(out / "flower_traffic.jsonl")
    assert traffic and all(r["status"] == "ok" and r["flower_down_tensor"] == r["meter_down"] for r in traffic)


def test_intra_group_rounds_and_per_device_ranks(tiny_cfg, tmp_path, two_tier):
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 4, "method.name": "twotier"})
    local = Simulation(cfg).run()
    sim, out = _flower_sim(cfg, tmp_path, LoopbackGrid([0, 1, 2, 3]))
    _same_rows(local, sim.run(), tol=1e-6)
    traffic = read_jsonl(out / "flower_traffic.jsonl")
    assert len(traffic) == 2 * 2 * 4  # rounds x tau x devices
    later = [r for r in traffic if r["download"] == "trained"]
    first = {(r["round"], r["device"]): r for r in traffic if r["download"] == "all"}
    assert later and all(r["status"] == "ok" and r["flower_down_tensor"] == r["meter_down"] for r in later)
    # only the trained layers and the head travel once the device holds the frozen layers
    assert all(r["flower_down_tensor"] < first[(r["round"], r["device"])]["flower_down_tensor"] for r in later
               if r["device"] % 2 == 0)


def test_device_that_lost_its_copy_gets_the_full_payload(tiny_cfg, tmp_path, two_tier):
    cfg = tiny_cfg(**{"run.rounds": 1, "fleet.num_devices": 4, "method.name": "twotier"})
    local = Simulation(cfg).run()
    sim, out = _flower_sim(cfg, tmp_path, LoopbackGrid([0, 1, 2, 3], forget={2}))
    _same_rows(local, sim.run(), tol=1e-6)
    resent = [r for r in read_jsonl(out / "flower_traffic.jsonl") if r["status"] == "resent-full"]
    assert [r["device"] for r in resent] == [2]
    assert resent[0]["flower_down_tensor"] > resent[0]["meter_down"]  # both attempts really crossed the wire


def test_failed_devices_are_dropped_and_recorded(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 4})
    grid = LoopbackGrid([0, 1, 3], silent={1}, crash={3})  # no node plays device 2
    sim, out = _flower_sim(cfg, tmp_path, grid)
    rows = sim.run()
    assert [r["participant_ids"] for r in rows[1:]] == [[0], [0]]
    assert [r["dropped"] for r in rows[1:]] == [[1, 2, 3], [1, 2, 3]]
    status = {r["device"]: r["status"] for r in read_jsonl(out / "flower_traffic.jsonl") if r["round"] == 1}
    assert status[0] == "ok" and status[1] == "timeout" and status[2] == "no-node" and status[3].startswith("error")
    start = next(e for e in read_jsonl(out / "flower_nodes.jsonl") if e["event"] == "start")
    assert start["missing"] == [2]


def test_run_config_and_cli_options(tmp_path, capsys):
    from hierfedlora.flower.server_app import ServerOptions, resolve_config_path

    o = ServerOptions.from_run_config({"experiment-config": "configs/x.toml", "set": "run.rounds=3; train.lr=5e-4;",
                                       "run-dir": "/r", "round-timeout": 30, "resume": True})
    assert o.overrides == ("run.rounds=3", "train.lr=5e-4") and o.round_timeout == 30.0 and o.resume
    (tmp_path / "app" / "configs").mkdir(parents=True)
    (tmp_path / "app" / "configs" / "x.toml").write_text("")
    assert resolve_config_path("configs/x.toml", tmp_path / "app") == tmp_path / "app" / "configs" / "x.toml"
    assert resolve_config_path("", tmp_path) is None
    assert main(["flower", "--auth"]) == 2 and "--tls" in capsys.readouterr().err
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}")
    assert main(["flower", "--out", str(out)]) == 2 and "--resume" in capsys.readouterr().err


# -- real processes on 127.0.0.1 -------------------------------------------------------------
@pytest.fixture
def federation(tmp_path):
    """Factory for LocalFederation; every federation it made is stopped at teardown, pass or fail."""
    made: list[LocalFederation] = []

    def make(n: int, **kw) -> LocalFederation:
        fed = LocalFederation(tmp_path / f"fed{len(made)}", n, log=lambda *_: None, **kw)
        made.append(fed)
        return fed.start(timeout=120)

    yield make
    for fed in made:
        fed.stop()
    for fed in made:  # nothing we started outlives the test
        assert fed.superlink.poll() is not None and all(p.poll() is not None for p in fed.nodes.values())


REPO = Path(__file__).resolve().parents[1]


def _run_both(cfg, tmp_path, fed, timeout: float = 600, app_dir=None):
    """The in-process run and the Flower run of one config; returns both run directories."""
    cfg_path = tmp_path / "experiment.toml"
    dump_config(cfg, cfg_path)
    run_experiment(cfg, tmp_path / "local", progress=False, export=False)
    status = fed.run({"experiment-config": str(cfg_path), "run-dir": str(tmp_path / "flower"), "round-timeout": 180.0,
                      "node-wait": 120.0, "query-timeout": 120.0}, timeout=timeout, app_dir=app_dir)
    assert status == "finished:completed", (status, (fed.root / "logs" / "superlink.log").read_text()[-3000:])
    return tmp_path / "local", tmp_path / "flower"


def _final_metrics_agree(local_dir, flower_dir):
    a, b = read_jsonl(local_dir / "metrics.jsonl"), read_jsonl(flower_dir / "metrics.jsonl")
    _same_rows(a, b, tol=1e-5)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (local_dir, flower_dir))
    assert sa["final_acc"] == pytest.approx(sb["final_acc"], abs=1e-9)
    assert sa["bytes_total"] == sb["bytes_total"]
    # job by job, the tensors Flower carried are what the meter booked for that device
    jobs = read_jsonl(flower_dir / "flower_traffic.jsonl")
    assert jobs and all(r["status"] == "ok" and r["flower_down_tensor"] == r["meter_down"]
                        and r["flower_up_tensor"] == r["meter_up"] for r in jobs)
    # the final server states (every LoRA factor and the head) agree, not only the metrics
    xa, xb = (torch.load(d / "checkpoint.pt", weights_only=False)["state"] for d in (local_dir, flower_dir))
    assert set(xa) == set(xb) and all(torch.allclose(xa[k], xb[k], atol=1e-5, rtol=1e-4) for k in xa)


@pytest.fixture
def no_stray_processes():
    """Safety net for tests whose processes a command starts: none may outlive the test."""
    import psutil

    yield
    stray = psutil.Process().children(recursive=True)
    for p in stray:
        p.kill()
    assert not stray, [p.pid for p in stray]


@pytest.mark.flower_processes
def test_fedlora_over_tls_with_supernode_auth_matches_engine(tiny_cfg, tmp_path, no_stray_processes, capsys):
    """`hierfedlora flower --tls --auth`: 3 SuperNodes, every link TLS, every node registered by its key."""
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 3, "train.threads": 1})
    cfg_path = tmp_path / "experiment.toml"
    dump_config(cfg, cfg_path)
    run_experiment(cfg, tmp_path / "local", progress=False, export=False)
    work = tmp_path / "fed"
    assert main(["flower", str(cfg_path), "--out", str(tmp_path / "flower"), "--work", str(work), "--tls", "--auth",
                 "--round-timeout", "180", "--node-wait", "120"]) == 0, capsys.readouterr().out
    flower = tmp_path / "flower"
    _final_metrics_agree(tmp_path / "local", flower)
    summary = json.loads((flower / "summary.json").read_text())
    # FedLoRA has no aggregator<->PS transfers: all the meter booked crossed Flower, byte for byte
    assert summary["flower"]["meter_bytes"] == summary["flower"]["flower_tensor_bytes"] == summary["bytes_total"]
    net = json.loads((flower / "flower_run.json").read_text())["network-traffic"]
    assert net["total-bytes"] >= summary["flower"]["flower_wire_bytes"]  # Flower's own count, with protocol overhead
    log = (work / "logs" / "superlink.log").read_text()
    assert "running on https://127.0.0.1:" in log  # TLS, and every SuperNode was registered by its key
    assert log.count("RegisterNode] Created node_id") == 3
    assert "round 2: 3 devices" in capsys.readouterr().out


@pytest.mark.flower_processes
def test_hierfedlora_across_supernodes_matches_engine(tiny_cfg, tmp_path, federation):
    if "hierfedlora" not in registry.available():
        pytest.fail("strategy 'hierfedlora' is not in hierfedlora.strategies yet")
    cfg = tiny_cfg(**{"run.rounds": 1, "fleet.num_devices": 3, "train.threads": 1, "method.name": "hierfedlora",
                      "method.num_groups": 2, "method.taus": [2]})
    fed = federation(3)
    local, flower = _run_both(cfg, tmp_path, fed, app_dir=REPO)  # `flwr run <repo>`: pyproject's [tool.flwr.app]
    _final_metrics_agree(local, flower)
    calls = [e for e in read_jsonl(flower / "flower_nodes.jsonl") if e["event"] == "train"]
    # one send_and_receive per intra-group round, carrying the jobs of both groups (3 devices)
    assert len(calls) == 2 and all(sorted(c["sent"]) == [0, 1, 2] for c in calls)
    traffic = read_jsonl(flower / "flower_traffic.jsonl")
    later = [r for r in traffic if r["download"] == "trained"]
    assert later and all(r["status"] == "ok" and r["flower_down_tensor"] == r["meter_down"] for r in later)


@pytest.mark.flower_processes
def test_killed_supernode_is_dropped_then_rejoins(tiny_cfg, tmp_path, federation):
    cfg = tiny_cfg(**{"run.rounds": 3, "fleet.num_devices": 3, "train.threads": 1})
    cfg_path = tmp_path / "experiment.toml"
    dump_config(cfg, cfg_path)
    fed = federation(3)
    out = tmp_path / "flower"
    node_log = fed.root / "logs" / "supernode-2.log"
    state = {"killed": False}

    def chaos() -> None:
        """Once device 2's SuperNode has received its round-2 job, kill it (SIGKILL, mid-round) and
        start a new SuperNode for device 2 at once: round 2 must drop device 2, round 3 re-map it."""
        if not state["killed"] and node_log.read_text(errors="replace").count("Receiving: train message") >= 2:
            fed.kill_supernode(2)
            fed.start_supernode(2)
            state["killed"] = True

    status = fed.run({"experiment-config": str(cfg_path), "run-dir": str(out), "round-timeout": 60.0,
                      "node-wait": 120.0, "query-timeout": 120.0}, timeout=900, on_poll=chaos)
    assert status == "finished:completed" and state["killed"]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["participant_ids"] == [0, 1, 2]
    assert rows[2]["participant_ids"] == [0, 1] and rows[2]["dropped"] == [2]
    assert rows[3]["participant_ids"] == [0, 1, 2]  # the restarted SuperNode rejoined as device 2
    events = read_jsonl(out / "flower_nodes.jsonl")
    assert any(e["event"] in ("replaced", "joined") and e.get("device") == 2 and e["round"] == 3 for e in events)
    failed = [e for e in events if e["event"] == "train" and e["round"] == 2][0]["failed"]
    assert set(failed) == {"2"}


def _stop_processes_mentioning(text: str) -> None:
    """Kill every process whose command line mentions `text`, and its children."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])):
                for c in p.children(recursive=True):
                    c.kill()
                p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.flower_processes
def test_flwr_run_on_the_simulation_runtime_matches_engine(tiny_cfg, tmp_path):
    """README's `flwr run . local`: Flower's simulation runtime (Ray, 3 virtual SuperNodes) runs
    this repository as a Flower App and gives the in-process run's metrics, tensors and traffic."""
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 3, "train.threads": 1})
    cfg_path = tmp_path / "experiment.toml"
    dump_config(cfg, cfg_path)
    run_experiment(cfg, tmp_path / "local", progress=False, export=False)
    home = tmp_path / "flwr-home"  # the managed local SuperLink lives under it
    home.mkdir()
    overrides = tmp_path / "run-config.toml"
    overrides.write_text(tomli_w.dumps({"experiment-config": str(cfg_path), "run-dir": str(tmp_path / "flower")}))
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    try:
        out = subprocess.run([str(Path(bin_dir) / "flwr"), "run", str(REPO), "local", "--federation-config",
                              "num-supernodes=3", "--run-config", str(overrides), "--stream"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        _stop_processes_mentioning(str(home))
    log = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0 and (tmp_path / "flower" / "summary.json").exists(), log
    assert "3 simulated SuperNodes" in log
    _final_metrics_agree(tmp_path / "local", tmp_path / "flower")
