"""Experiment tracking: a run's per-round metrics, config and summary mirrored to TensorBoard event
files and to an MLflow tracking store (the `[tracking]` settings).

The run directory stays the source of truth (`metrics.jsonl`, `summary.json`); the trackers only
mirror it. They never change results, and their settings are left out of the checkpoint's
fingerprint, so tracking can be switched on for a run that is resumed.

**Every (metric, round) exactly once.** A resumed run reloads its rows from the checkpoint and runs
again the rounds after it, some of which a killed run may already have logged. So each store is
asked, when a run opens, what it already holds, and the run's rows so far are replayed against it:

- MLflow logs a round only if it is after the last round in the store (each round is one
  `log_batch`, all of it or none);
- TensorBoard purges from its last logged round on (`SummaryWriter(purge_step=...)`, the event
  format's own restart marker, which readers apply) and logs that round again, so a round cut
  off mid-write is replaced whole.

The MLflow run id is kept in the run directory (`tracking.json`), so `--resume` continues the same
MLflow run; a comparison is an MLflow parent run whose runs are nested under it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hierfedlora.errors import ConfigError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from hierfedlora.config import ExperimentConfig, TrackingConfig

DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"  # MLflow's own default: `mlflow ui` in this directory opens it
STATE_FILE = "tracking.json"  # in a run (or comparison) directory: the MLflow run it is logged to
TENSORBOARD_DIR = "tensorboard"
MARKER = "sim_time_s"  # a metric every row has: its last step is the last round in the store
# files of a finished run copied to its MLflow run (those that exist)
ARTIFACTS = ("config.toml", "summary.json", "metrics.jsonl", "memory.json", "accuracy.png")
REPORT_ARTIFACTS = ("report.md", "table.json", "budget.json", "accuracy_vs_time.png", "accuracy_vs_traffic.png",
                    "time_to_target.png")


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The numbers (and booleans, as 0/1) of a metrics row or summary: what a scalar store can hold;
    lists (participant ids), text and unset values are left out."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and k != "round" and math.isfinite(v)}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> text (`train.lr` -> "0.003"): MLflow params are flat strings.
    Text stays as it is; everything else is written as JSON (true, [\"query\", \"value\"])."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, str) else json.dumps(v)
    return out


def run_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The MLflow params of a run: its resolved config, flattened, without where it is tracked to."""
    d = cfg.to_dict()
    d.pop("tracking", None)
    return flatten(d)


@dataclass(frozen=True)
class Lineage:
    """Where a run sits in the tracking store: its display name, and the MLflow run of the
    comparison it belongs to (None for a run of its own). Plain data, so it crosses to Ray workers."""

    name: str
    parent_run_id: str | None = None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}  # a damaged record: the run is logged to a new MLflow run


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


# -- MLflow --------------------------------------------------------------------------------
@dataclass
class MLflowStore:
    """A connected MLflow tracking store and the experiment runs are logged under."""

    client: MlflowClient
    uri: str
    experiment_id: str


def connect_mlflow(settings: TrackingConfig) -> MLflowStore:
    """Open the tracking store of `settings` and find (or create) its experiment, or raise a
    ConfigError naming the URI: called before a run writes anything, so a wrong URI costs nothing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = settings.mlflow_uri or DEFAULT_MLFLOW_URI
    name = settings.mlflow_experiment
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(name, artifact_location=_artifact_location(uri))
            except MlflowException:  # created meanwhile by another run of the same comparison
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
                exp_id = found.experiment_id
        elif exp.lifecycle_stage == "deleted":
            raise ConfigError(f"MLflow experiment '{name}' in '{uri}' is deleted; restore it (mlflow experiments "
                              "restore) or pick another tracking.mlflow_experiment.")
        else:
            exp_id = exp.experiment_id
    except MlflowException as e:
        raise ConfigError(f"tracking.mlflow_uri '{uri}' cannot be used as an MLflow tracking store: "
                          f"{e.message.splitlines()[0]} Give sqlite:///PATH.db, a database URL or a server "
                          "http://HOST:PORT, or unset it for sqlite:///mlflow.db.") from None
    return MLflowStore(client, uri, exp_id)


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a new experiment in a SQLite store: `mlruns/` beside the database file (MLflow
    would put them under the working directory, wherever the run was started from); other stores
    keep their own default."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    return (Path(uri[len(prefix):]).resolve().parent / "mlruns").as_uri()


def _open_mlflow_run(store: MLflowStore, state_path: Path, name: str, tags: dict[str, str]) -> tuple[str, bool]:
    """(run id, whether it is new): the MLflow run recorded in `state_path` when it is in this store
    and not deleted (set running again), else a new one, recorded there."""
    from mlflow.exceptions import MlflowException

    state = _read_state(state_path)
    run_id = state.get("mlflow_run_id") if state.get("mlflow_uri") == store.uri else None
    if run_id:
        try:
            run = store.client.get_run(run_id)
        except MlflowException:  # removed from the store: log to a new run
            run = None
        if run is not None and run.info.lifecycle_stage != "deleted":
            store.client.update_run(run_id, status="RUNNING")
            return run_id, False
    run = store.client.create_run(store.experiment_id, run_name=name, tags=tags)
    _write_state(state_path, {"mlflow_uri": store.uri, "mlflow_experiment_id": store.experiment_id,
                              "mlflow_run_id": run.info.run_id})
    return run.info.run_id, True


class MLflowSink:
    """One run's metrics in MLflow: params = the flattened config, a metric per numeric key of each
    row at step = round, the summary as `summary/<key>` at the last round, the run's files as
    artifacts."""

    def __init__(self, store: MLflowStore, cfg: ExperimentConfig, out: Path, lineage: Lineage) -> None:
        self.client, self.out = store.client, out
        tags = {"run_dir": str(out.resolve())}
        if lineage.parent_run_id:
            tags["mlflow.parentRunId"] = lineage.parent_run_id  # MLflow's own nesting tag
        self.run_id, new = _open_mlflow_run(store, out / STATE_FILE, lineage.name, tags)
        self._log_params(run_params(cfg), {} if new else self.client.get_run(self.run_id).data.params)
        self.next_round = self._last_step(MARKER) + 1

    def _last_step(self, key: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def _log_params(self, params: dict[str, str], logged: dict[str, str]) -> None:
        """Params are immutable in MLflow: those the run lacks are logged; a value changed since
        (only settings that leave results alone can: rounds, budget_s when a comparison extends a run)
        goes to a tag `config.<key>`, and config.toml among the artifacts is the current one."""
        from mlflow.entities import Param, RunTag

        missing = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"config.{k}", v) for k, v in params.items() if k in logged and logged[k] != v]
        for i in range(0, len(missing), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=missing[i:i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_row(self, row: dict[str, Any]) -> None:
        if row["round"] < self.next_round:
            return  # already in the store (logged before a kill)
        self._log_metrics(numeric(row), row["round"])
        self.next_round = row["round"] + 1

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        values = {f"summary/{k}": v for k, v in numeric(summary).items()}
        if values and self._last_step(next(iter(values))) < step:  # one batch: all of it is there or none
            self._log_metrics(values, step)
        self.client.set_tag(self.run_id, "method", str(summary.get("method", "")))
        for name in ARTIFACTS:
            if (self.out / name).is_file():
                self.client.log_artifact(self.run_id, str(self.out / name))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


# -- TensorBoard ---------------------------------------------------------------------------
def last_logged_step(logdir: Path) -> int | None:
    """The largest step in the event files of `logdir` as a reader sees them (earlier purges
    applied), or None when it holds none."""
    if not logdir.is_dir() or not any(p.name.startswith("events.out.tfevents") for p in logdir.iterdir()):
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    steps = [e.step for t in tags["scalars"] for e in acc.Scalars(t)]
    steps += [e.step for t in tags["tensors"] for e in acc.Tensors(t)]
    return max(steps, default=None)


def _code(text: str) -> str:
    """Text shown verbatim by TensorBoard's text plugin (it renders Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoardSink:
    """One run in TensorBoard event files (`<run dir>/tensorboard`): a scalar per numeric key of each
    row at step = round, the config as text, the summary as `summary/<key>` scalars and text at the
    last round."""

    def __init__(self, cfg: ExperimentConfig, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        logdir = out / TENSORBOARD_DIR
        last = last_logged_step(logdir)
        # purge from the last logged round on and log it again: a round cut off mid-write comes back whole
        self.next_round = 0 if last is None else last
        self.writer = SummaryWriter(str(logdir), purge_step=last)
        import tomli_w

        self.writer.add_text("config", _code(tomli_w.dumps(cfg.to_dict())), self.next_round)

    def log_row(self, row: dict[str, Any]) -> None:
        if row["round"] < self.next_round:
            return  # already in the event files (logged before a kill)
        for k, v in numeric(row).items():
            self.writer.add_scalar(k, v, row["round"])
        self.writer.flush()  # on disk before the next round: a kill loses at most the round in flight
        self.next_round = row["round"] + 1

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        for k, v in numeric(summary).items():
            self.writer.add_scalar(f"summary/{k}", v, step)
        self.writer.add_text("summary", _code(json.dumps(summary, indent=2)), step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


# -- what run_experiment talks to ----------------------------------------------------------
class Sink(Protocol):
    """A store one run is mirrored to. `log_row` is given every row in order, including rows the
    store already holds (it skips those); `close` gets MLflow's run status."""

    def log_row(self, row: dict[str, Any]) -> None: ...

    def log_summary(self, summary: dict[str, Any], step: int) -> None: ...

    def close(self, status: str) -> None: ...


@dataclass
class Tracker:
    """The stores a run is mirrored to (none when tracking is off)."""

    sinks: list[Sink]

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            for s in self.sinks:
                s.log_row(row)

    def finish(self, summary: dict[str, Any]) -> None:
        """Log the summary (at the last round) and the run's files, and mark the run finished."""
        for s in self.sinks:
            s.log_summary(summary, int(summary["rounds"]))
        self.close("FINISHED")

    def close(self, status: str) -> None:
        sinks, self.sinks = self.sinks, []  # closed once: after finish, or on the way out of a failed run
        for s in sinks:
            s.close(status)


def connect(cfg: ExperimentConfig) -> MLflowStore | None:
    """The MLflow store of a run with `tracking.mlflow` on (checked now, before anything is written)."""
    return connect_mlflow(cfg.tracking) if cfg.tracking.mlflow else None


def open_tracker(cfg: ExperimentConfig, out: Path, store: MLflowStore | None, lineage: Lineage,
                 rows: list[dict[str, Any]]) -> Tracker:
    """The tracker of the run in `out`, its rows so far (from a checkpoint) replayed into each store."""
    sinks: list[Sink] = []
    if cfg.tracking.tensorboard:
        sinks.append(TensorBoardSink(cfg, out))
    if store is not None:
        sinks.append(MLflowSink(store, cfg, out, lineage))
    tracker = Tracker(sinks)
    tracker.log_rows(rows)
    return tracker


@dataclass
class Comparison:
    """A comparison's MLflow parent run (its id in the comparison directory's `tracking.json`):
    each run of the grid is nested under it, and the report is logged to it."""

    store: MLflowStore
    run_id: str
    out: Path

    @classmethod
    def open(cls, cfg: ExperimentConfig, out: Path) -> Comparison | None:
        """The parent run of the comparison in `out` (the same one when it is run again), or None
        with `tracking.mlflow` off."""
        if not cfg.tracking.mlflow:
            return None
        store = connect_mlflow(cfg.tracking)
        run_id, _ = _open_mlflow_run(store, out / STATE_FILE, out.name, {"comparison_dir": str(out.resolve())})
        return cls(store, run_id, out)

    def lineage(self, label: str, seed: int) -> Lineage:
        return Lineage(f"{label}/seed{seed}", self.run_id)

    def finish(self) -> None:
        for name in REPORT_ARTIFACTS:
            if (self.out / name).is_file():
                self.store.client.log_artifact(self.run_id, str(self.out / name))
        self.store.client.set_terminated(self.run_id, status="FINISHED")
