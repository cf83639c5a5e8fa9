"""Experiment tracking (tracking.py): runs mirrored to TensorBoard event files and a real local
MLflow store (SQLite), read back and checked against the run directory, the source of truth."""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import tomli_w
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hierfedlora import tracking
from hierfedlora.cli import main
from hierfedlora.compare import run_comparison
from hierfedlora.engine import config_fingerprint
from hierfedlora.errors import ConfigError
from hierfedlora.experiment import run_experiment


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def expected_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(round, value)] of every number in metrics.jsonl (lists and text aside)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k != "round" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((r["round"], float(v)))
    return out


def tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def mlflow_series(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def assert_tb_equal(got: dict, want: dict) -> None:
    """Event files hold float32: each (tag, step) once, with metrics.jsonl's value."""
    for k, series in want.items():
        assert [s for s, _ in got[k]] == [s for s, _ in series], k
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in series], rel=1e-6), k


def flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v if isinstance(v, str) else json.dumps(v)})
    return out


@pytest.fixture
def tracked(tiny_cfg, tmp_path):
    """Factory: `tiny_cfg` with both trackers on, MLflow in a SQLite store under tmp_path."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"

    def make(**overrides):
        return tiny_cfg(**{"tracking.tensorboard": True, "tracking.mlflow": True, "tracking.mlflow_uri": uri, **overrides})

    make.uri = uri
    return make


def test_numeric_keeps_numbers_and_flatten_gives_dotted_text():
    row = {"round": 3, "test_acc": 0.5, "bytes_up": 10, "train_loss": None, "participant_ids": [1, 2],
           "budget_reached": True, "method": "fedlora"}
    assert tracking.numeric(row) == {"test_acc": 0.5, "bytes_up": 10.0, "budget_reached": 1.0}
    assert tracking.flatten({"a": {"b": 1, "c": "x", "d": [1, "y"]}, "e": False}) == {
        "a.b": "1", "a.c": "x", "a.d": '[1, "y"]', "e": "false"}


def test_tracking_settings_leave_the_fingerprint_alone(tiny_cfg):
    assert config_fingerprint(tiny_cfg(**{"tracking.mlflow": True, "tracking.tensorboard": True,
                                          "tracking.mlflow_experiment": "x"})) == config_fingerprint(tiny_cfg())


def test_a_tracked_run_mirrors_its_metrics_config_and_summary(tracked, tmp_path):
    cfg = tracked(**{"run.rounds": 2})
    out = tmp_path / "run"
    summary = run_experiment(cfg, out, progress=False, export=False)
    rows = read_rows(out)
    want = expected_series(rows)
    assert "test_acc" in want and len(want["sim_time_s"]) == 3  # rounds 0..2

    tb = tb_scalars(out / "tensorboard")
    assert_tb_equal(tb, want)
    assert tb["summary/final_acc"] == [(2, pytest.approx(summary["final_acc"], rel=1e-6))]

    state = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=tracked.uri)
    run = client.get_run(state["mlflow_run_id"])
    got = mlflow_series(client, run.info.run_id)
    assert {k: got[k] for k in want} == want  # SQLite keeps doubles: exact
    assert got["summary/final_acc"] == [(2, summary["final_acc"])]
    assert got["summary/bytes_total"] == [(2, float(summary["bytes_total"]))]
    stored = tomllib.loads((out / "config.toml").read_text())
    assert stored["tracking"]["mlflow"] is True
    del stored["tracking"]
    assert run.data.params == flat(stored) and run.data.params["train.lr"] == "0.02"
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["method"] == "fedlora"
    assert {"config.toml", "summary.json", "metrics.jsonl"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # artifacts beside the SQLite file, not in the working directory
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path / "store")


class Killed(Exception):
    pass


def test_a_run_killed_after_logging_past_its_checkpoint_resumes_into_the_same_run_once(tracked, tmp_path,
                                                                                         monkeypatch):
    cfg = tracked(**{"run.rounds": 4, "run.eval_every": 2, "run.checkpoint_every": 2})
    out = tmp_path / "run"
    log_rows = tracking.Tracker.log_rows

    def log_then_kill(self, rows):  # killed once round 3 is in both stores; the checkpoint is at round 2
        log_rows(self, rows)
        if any(r["round"] == 3 for r in rows):
            raise Killed

    monkeypatch.setattr(tracking.Tracker, "log_rows", log_then_kill)
    with pytest.raises(Killed):
        run_experiment(cfg, out, progress=False, export=False)
    monkeypatch.undo()
    client = MlflowClient(tracking_uri=tracked.uri)
    run_id = json.loads((out / "tracking.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
    assert [s for s, _ in mlflow_series(client, run_id)["sim_time_s"]] == [0, 1, 2, 3]

    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    want = expected_series(read_rows(out))
    assert [s for s, _ in want["sim_time_s"]] == [0, 1, 2, 3, 4]
    assert json.loads((out / "tracking.json").read_text())["mlflow_run_id"] == run_id
    got = mlflow_series(client, run_id)
    assert {k: got[k] for k in want} == want  # every (metric, round) exactly once
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    tb = tb_scalars(out / "tensorboard")
    assert_tb_equal(tb, want)
    assert all(Counter(s for s, _ in series).most_common(1)[0][1] == 1 for series in tb.values())


def test_tracking_switched_on_when_resuming_logs_the_checkpointed_rounds_too(tiny_cfg, tracked, tmp_path,
                                                                             interrupted_run):
    cfg = tiny_cfg(**{"run.rounds": 4, "run.eval_every": 2, "run.checkpoint_every": 2})
    out = tmp_path / "run"
    interrupted_run(cfg, out, after=3)  # untracked; checkpoint at round 2
    assert main(["run", "--resume", str(out), "--quiet", "--set", "tracking.mlflow=true",
                 "--set", f'tracking.mlflow_uri="{tracked.uri}"', "--set", "tracking.tensorboard=true"]) == 0
    assert tomllib.loads((out / "config.toml").read_text())["tracking"]["mlflow"] is True  # kept for later resumes
    want = expected_series(read_rows(out))
    client = MlflowClient(tracking_uri=tracked.uri)
    got = mlflow_series(client, json.loads((out / "tracking.json").read_text())["mlflow_run_id"])
    assert {k: got[k] for k in want} == want
    assert_tb_equal(tb_scalars(out / "tensorboard"), want)


def test_resume_refuses_settings_other_than_tracking(tiny_cfg, tmp_path, interrupted_run, capsys):
    out = tmp_path / "run"
    interrupted_run(tiny_cfg(**{"run.rounds": 2}), out, after=1)
    assert main(["run", "--resume", str(out), "--quiet", "--set", "train.lr=0.1"]) == 2
    assert "only tracking.* settings" in capsys.readouterr().err


@pytest.mark.parametrize("uri", ["nosuch://nowhere", "{tmp}/plain-folder"])
def test_a_bad_tracking_uri_is_a_config_error_before_the_run_directory_is_written(tiny_cfg, tmp_path, uri, capsys):
    uri = uri.format(tmp=tmp_path)  # a folder: MLflow's file store, which this MLflow refuses
    cfg = tiny_cfg(**{"tracking.mlflow": True, "tracking.mlflow_uri": uri})
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        run_experiment(cfg, out, progress=False, export=False)
    assert not out.exists()
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(cfg.to_dict()))
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tracking.mlflow_uri") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_comparison_is_a_parent_run_with_its_runs_nested(tracked, tmp_path):
    cfg = tracked(**{"run.rounds": 1})
    path = tmp_path / "cmp.toml"
    path.write_text(tomli_w.dumps(cfg.to_dict()))
    out = tmp_path / "cmp"
    run_comparison(str(path), ["fedlora", "fedlora_topk"], 1, out, [], progress=False)
    client = MlflowClient(tracking_uri=tracked.uri)
    parent = client.get_run(json.loads((out / "tracking.json").read_text())["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "cmp"
    assert "report.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["fedlora/seed0", "fedlora_topk/seed0"]
    for r in children:
        label = r.info.run_name.split("/")[0]
        run_dir = out / label / "seed0"
        assert json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"] == r.info.run_id
        want = expected_series(read_rows(run_dir))
        got = mlflow_series(client, r.info.run_id)
        assert {k: got[k] for k in want} == want
        assert (run_dir / "tensorboard").is_dir()
