"""Real Flower processes on 127.0.0.1 (hierfedlora.flower.deploy, command, and the Flower App as
`flwr run` submits it): the same final metrics as the engine for FedLoRA over TLS with SuperNode
authentication and for HierFedLoRA, a SuperNode killed mid-run, and Flower's simulation runtime.
Every process a test starts is stopped in a finaliser, pass or fail; deselect these tests with
``-m "not flower_processes"``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from hierfedlora.cli import main
from hierfedlora.config import dump_config
from hierfedlora.experiment import run_experiment
from hierfedlora.flower.deploy import LocalFederation
from hierfedlora.strategies import registry


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


REPO = Path(__file__).resolve().parents[2]


def _run_both(cfg, tmp_path, fed, timeout: float = 600, app_dir=None):
    """The in-process run and the Flower run of one config; returns both run directories."""
    cfg_path = tmp_path / "experiment.toml"
    dump_config(cfg, cfg_path)
    run_experiment(cfg, tmp_path / "local", progress=False, export=False)
    status = fed.run({"experiment-config": str(cfg_path), "run-dir": str(tmp_path / "flower"), "round-timeout": 180.0,
                      "node-wait": 120.0, "query-timeout": 120.0}, timeout=timeout, app_dir=app_dir)
    assert status == "finished:completed", (status, (fed.root / "logs" / "superlink.log").read_text()[-3000:])
    return tmp_path / "local", tmp_path / "flower"


@pytest.fixture
def final_metrics_agree(read_jsonl, same_rows):
    """Assert a Flower run directory agrees with the in-process one: metrics, traffic, final state."""

    def check(local_dir, flower_dir):
        a, b = read_jsonl(local_dir / "metrics.jsonl"), read_jsonl(flower_dir / "metrics.jsonl")
        same_rows(a, b, tol=1e-5)
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

    return check


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
def test_fedlora_over_tls_with_supernode_auth_matches_engine(tiny_cfg, tmp_path, no_stray_processes, capsys,
                                                             final_metrics_agree):
    """`hierfedlora flower --tls --auth`: 3 SuperNodes, every link TLS, every node registered by its key."""
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 3, "train.threads": 1})
    cfg_path = tmp_path / "experiment.toml"
    dump_config(cfg, cfg_path)
    run_experiment(cfg, tmp_path / "local", progress=False, export=False)
    work = tmp_path / "fed"
    assert main(["flower", str(cfg_path), "--out", str(tmp_path / "flower"), "--work", str(work), "--tls", "--auth",
                 "--round-timeout", "180", "--node-wait", "120"]) == 0, capsys.readouterr().out
    flower = tmp_path / "flower"
    final_metrics_agree(tmp_path / "local", flower)
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
def test_hierfedlora_across_supernodes_matches_engine(tiny_cfg, tmp_path, federation, read_jsonl,
                                                      final_metrics_agree):
    if "hierfedlora" not in registry.available():
        pytest.fail("strategy 'hierfedlora' is not in hierfedlora.strategies yet")
    cfg = tiny_cfg(**{"run.rounds": 1, "fleet.num_devices": 3, "train.threads": 1, "method.name": "hierfedlora",
                      "method.num_groups": 2, "method.taus": [2]})
    fed = federation(3)
    local, flower = _run_both(cfg, tmp_path, fed, app_dir=REPO)  # `flwr run <repo>`: pyproject's [tool.flwr.app]
    final_metrics_agree(local, flower)
    calls = [e for e in read_jsonl(flower / "flower_nodes.jsonl") if e["event"] == "train"]
    # one send_and_receive per intra-group round, carrying the jobs of both groups (3 devices)
    assert len(calls) == 2 and all(sorted(c["sent"]) == [0, 1, 2] for c in calls)
    traffic = read_jsonl(flower / "flower_traffic.jsonl")
    later = [r for r in traffic if r["download"] == "trained"]
    assert later and all(r["status"] == "ok" and r["flower_down_tensor"] == r["meter_down"] for r in later)


@pytest.mark.flower_processes
def test_killed_supernode_is_dropped_then_rejoins(tiny_cfg, tmp_path, federation, read_jsonl):
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
def test_causal_lm_through_hierfedlora_flower_matches_engine(tiny_llm_cfg, tmp_path, no_stray_processes, capsys,
                                                             read_jsonl, final_metrics_agree):
    """Instruction tuning of a decoder (tiny Llama) over real SuperNodes: `hierfedlora flower` gives
    the in-process run's metrics (answer accuracy, exact match, response loss), tensors and traffic."""
    cfg = tiny_llm_cfg(**{"run.rounds": 2, "fleet.num_devices": 3, "train.threads": 1})
    cfg_path = tmp_path / "experiment.toml"
    dump_config(cfg, cfg_path)
    run_experiment(cfg, tmp_path / "local", progress=False, export=False)
    assert main(["flower", str(cfg_path), "--out", str(tmp_path / "flower"), "--work", str(tmp_path / "fed"),
                 "--round-timeout", "180", "--node-wait", "120"]) == 0, capsys.readouterr().out
    final_metrics_agree(tmp_path / "local", tmp_path / "flower")
    last = read_jsonl(tmp_path / "flower" / "metrics.jsonl")[-1]
    assert {"test_acc", "test_exact_match", "test_loss"} <= set(last)


@pytest.mark.flower_processes
@pytest.mark.parametrize("task", ["classification", "instruction"])
def test_flwr_run_on_the_simulation_runtime_matches_engine(task, request, tmp_path, final_metrics_agree):
    """README's `flwr run . local`: Flower's simulation runtime (Ray, 3 virtual SuperNodes) runs
    this repository as a Flower App and gives the in-process run's metrics, tensors and traffic,
    for a classifier and for instruction tuning of a decoder (tiny Llama)."""
    make = request.getfixturevalue("tiny_cfg" if task == "classification" else "tiny_llm_cfg")
    cfg = make(**{"run.rounds": 2, "fleet.num_devices": 3, "train.threads": 1})
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
    final_metrics_agree(tmp_path / "local", tmp_path / "flower")


@pytest.mark.flower_processes
def test_fedlora_under_secagg_across_supernodes_equals_the_plain_run(tiny_cfg, tmp_path, federation, read_jsonl):
    """SecAgg+ across 3 SuperNode processes (`fleet.secure_aggregation`): the server sees only the
    mean of the masked updates, and the run equals the plain in-process run within SecAgg+'s
    quantisation (tests/flower/test_secagg.py states the tolerance)."""
    # one round: every SecAgg+ stage is a fresh ClientApp process per device, the slowest part of CI
    kw = {"run.rounds": 1, "fleet.num_devices": 3, "train.threads": 1}
    run_experiment(tiny_cfg(**kw), tmp_path / "local", progress=False, export=False)
    cfg_path = tmp_path / "experiment.toml"
    dump_config(tiny_cfg(**kw, **{"fleet.secure_aggregation": True}), cfg_path)
    fed = federation(3)
    status = fed.run({"experiment-config": str(cfg_path), "run-dir": str(tmp_path / "flower"), "round-timeout": 180.0,
                      "node-wait": 120.0, "query-timeout": 120.0}, timeout=600)
    assert status == "finished:completed", (status, (fed.root / "logs" / "superlink.log").read_text()[-3000:])
    local, flower = tmp_path / "local", tmp_path / "flower"
    a, b = read_jsonl(local / "metrics.jsonl"), read_jsonl(flower / "metrics.jsonl")
    assert [r.get("participant_ids") for r in a] == [r.get("participant_ids") for r in b]
    for ra, rb in zip(a, b):
        for k in ("test_acc", "test_loss", "train_loss", "bytes_up", "bytes_down"):
            if k in ra and ra[k] is not None:
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-4), (k, ra["round"])
    xa, xb = (torch.load(d / "checkpoint.pt", weights_only=False)["state"] for d in (local, flower))
    assert set(xa) == set(xb) and all(torch.allclose(xa[k], xb[k], rtol=0, atol=1e-4) for k in xa)
    jobs = read_jsonl(flower / "flower_traffic.jsonl")
    assert len(jobs) == 3 and all(r["status"] == "ok" and r["flower_up_array"] == 0 and r["flower_secagg_up_wire"] > 0
                                  for r in jobs)
