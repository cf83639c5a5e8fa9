"""The library entry point: run one experiment into a run directory, as every front end does.

`hierfedlora run`, `hierfedlora compare`, `hierfedlora flower` and the Flower ServerApp all call
`run_experiment`; the rules about run directories (never clobber a run unless asked, resume from
the run's own config) live here once, so the front ends cannot drift apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hierfedlora import tracking
from hierfedlora.config import ExperimentConfig, dump_config, load_config
from hierfedlora.errors import ConfigError, RunDirError
from hierfedlora.tracking import Lineage

if TYPE_CHECKING:
    from hierfedlora.engine import Simulation


def default_out(config_path: str | None, suffix: str = "", prefix: str = "") -> Path:
    """runs/<prefix><config name><suffix> (config name "default" without a config file)."""
    return Path("runs") / (prefix + (Path(config_path).stem if config_path else "default") + suffix)


LOCK = ".lock"  # held (flock) by the process writing a run directory; see `run_lock`


def resume_config(out: Path, config: str | None, overrides: list[str]) -> ExperimentConfig:
    """The config of the run in `out`, for --resume; a resumed run takes no other config."""
    path = out / "config.toml"
    if not path.is_file():
        raise RunDirError(f"'{out}' is not a run directory (no config.toml); pass the directory a run wrote.")
    if config or any(not o.startswith("tracking.") for o in overrides):
        raise ConfigError("--resume takes the run's own config.toml; drop the CONFIG and --set arguments "
                          "(only tracking.* settings may be set, e.g. --set tracking.mlflow=true).")
    return load_config(path, overrides)  # tracking.* mirror the run and leave its results alone


def check_writable(out: Path) -> None:
    """Refuse a run directory that cannot be created or written, before any set-up: the nearest
    folder on its path that exists must take a new file."""
    p = out.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise RunDirError(f"run directory '{out}' cannot be created: '{p}' is a file, not a directory; pick another --out.")
    try:
        fd, probe = tempfile.mkstemp(dir=p, prefix=".hierfedlora-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunDirError(f"run directory '{out}' is not writable ({e.strerror or e} in '{p}'); pick another --out "
                          "or make it writable.") from None


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold `out` for this process while it writes the run: another process that would write it
    (a second run, --resume, --overwrite, compare) is refused instead of interleaving its files.
    The lock is an flock on `out/.lock`, so a killed process releases it without help."""
    from filelock import FileLock, Timeout

    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(f"run directory '{out}' is in use by another process (a run, resume or overwrite of it "
                          "is still going); wait for it to end, or pick another --out.") from None
    try:
        yield
    finally:
        lock.release()


def _in_use(out: Path) -> bool:
    """Whether another process holds `out`'s run lock now."""
    if not (out / LOCK).exists():
        return False
    try:
        with run_lock(out):
            return False
    except RunDirError:
        return True


def check_run_dir(out: Path, overwrite: bool) -> list[Path]:
    """Refuse to clobber an earlier run in `out` unless asked to, and never a directory that holds
    files but no run (or a file), one another process is writing, or one that cannot be written.
    Returns the entries of the run that --overwrite replaces (none for a new directory)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory '{out}' is a file, not a directory; pick another --out.")
    old = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if old:
        if not overwrite:
            raise RunDirError(f"run directory '{out}' already holds a run; use --resume {out} to continue it, "
                              "--overwrite to replace it, or --out to pick another directory.")
        if not (out / "config.toml").is_file():
            raise RunDirError(f"'{out}' holds files but no run (no config.toml); --overwrite replaces run "
                              "directories only: pick another --out.")
    if _in_use(out):
        raise RunDirError(f"run directory '{out}' is in use by another process; wait for it to end, or pick another --out.")
    check_writable(out)
    return old


def select_run(config: str | None, overrides: list[str], out: str | None, resume: str | None, overwrite: bool,
               suffix: str = "") -> tuple[ExperimentConfig, Path]:
    """(config, run directory) of an experiment command's arguments: --resume DIR takes DIR's own
    config; otherwise CONFIG with --set overrides goes to --out (default `default_out`), which
    must not hold another run unless --overwrite."""
    if resume:
        if out or overwrite:
            raise ConfigError(f"--resume {resume} continues that run in place; drop --out and --overwrite (to start "
                              "it again elsewhere, give its config.toml as CONFIG with --out).")
        path = Path(resume)
        return resume_config(path, config, overrides), path
    cfg = load_config(config, overrides)
    path = Path(out) if out else default_out(config, suffix)
    check_run_dir(path, overwrite)
    return cfg, path


def prepare_run_dir(cfg: ExperimentConfig, out: Path, overwrite: bool, old: list[Path] | None = None) -> None:
    """Create the run directory and write the resolved config into it; with `overwrite`, everything
    of the run it held goes first (plots and method outputs too). `old`: those entries, as
    `check_run_dir` returned them (default: check now)."""
    for p in check_run_dir(out, overwrite) if old is None else old:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.toml")


def check_data(cfg: ExperimentConfig) -> None:
    """Read the run's data as the engine will, before the engine and the model load: a data or
    `data.cache_dir` problem is then reported in seconds, not after a model is loaded (or
    dequantised), and before anything is written. Its warnings (dropped rows) wait for the real read."""
    import warnings

    from hierfedlora import data, instruct

    d = cfg.data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cfg.task.kind == "instruction":
            instruct.load_instructions(d.name, answers=cfg.task.answers, prompt_column=d.prompt_column,
                                       input_column=d.input_column, response_column=d.response_column, split=d.split)
        else:
            data.check_cache_dir(d.cache_dir)
            data.load_dataset(d.name, d.text_column, d.label_column, split=d.split)


def run_experiment(cfg: ExperimentConfig, out: Path, *, overwrite: bool = False, resume: bool = False,
                   progress: bool = True, export: bool = True, executor: Callable | None = None,
                   lineage: Lineage | None = None) -> dict[str, Any]:
    """Run (or resume) one experiment into `out`; returns its summary. `executor(sim)` builds what
    runs the devices' jobs (default: this process; `hierfedlora.flower` passes one that uses
    SuperNodes). The run holds `out`'s lock (`run_lock`) from before it writes there to its end.
    With `[tracking]` on, rows, config and summary are mirrored to TensorBoard / MLflow
    (`tracking`); `lineage`: the run's name there and the comparison it belongs to."""
    held = contextlib.ExitStack()
    if resume:
        check_writable(out)
        held.enter_context(run_lock(out))
    else:
        old = check_run_dir(out, overwrite)  # the entries of the run --overwrite replaces
    with held:
        check_data(cfg)  # before the engine's imports: a data problem is reported in seconds
        from tqdm.auto import tqdm

        from hierfedlora.engine import CHECKPOINT, Simulation

        store = tracking.connect(cfg)  # a bad tracking URI fails here, before anything is written
        t0 = time.perf_counter()
        # every setup error (data, model, device, groups, depths) surfaces here, before anything is
        # written: a corrected rerun is not refused, and --overwrite replaces the old run only now
        # (set-up may have put its data cache under `out`: that stays)
        sim = Simulation(cfg, out, executor=executor)
        if not resume:
            held.enter_context(run_lock(out))
            prepare_run_dir(cfg, out, overwrite, old=old)
        else:
            if (out / CHECKPOINT).exists():
                sim.load_checkpoint(out / CHECKPOINT)
            if load_config(out / "config.toml") != cfg:
                dump_config(cfg, out / "config.toml")  # the same run; --set tracking.* changed how it is mirrored
        tracker = tracking.open_tracker(cfg, out, store, lineage or Lineage(out.name), sim.rows)
        bar = tqdm(total=cfg.run.rounds, initial=sim.round, desc=sim.method, unit="round",
                   disable=not progress, dynamic_ncols=True)
        last_acc: list[float] = []

        key = sim.score_key  # test accuracy, or ROUGE-L for open-ended instruction data

        def on_round(row: dict[str, Any]) -> None:
            tracker.log_rows([row])
            if key in row:
                last_acc[:] = [row[key]]
            if row["round"] > 0:
                bar.update(1)
            post = {"sim": f"{row['sim_time_s'] / 60:.1f}min"}
            if cfg.run.budget_s is not None:
                post["sim"] += f" of {cfg.run.budget_s / 60:.1f}"
            if last_acc:
                post[key[5:]] = f"{100 * last_acc[0]:.1f}%"
            bar.set_postfix(post)

        try:
            sim.run(on_round)
        except BaseException as e:
            tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            bar.close()
            sim.executor.close()
        summary = write_run_files(sim, cfg, out, export, key)
        summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
        # written last: summary.json marks a finished run (compare reuses such runs; one killed while
        # exporting has none and is resumed, which exports again)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.finish(summary)
        return summary


def write_run_files(sim: "Simulation", cfg: ExperimentConfig, out: Path, export: bool, key: str) -> dict[str, Any]:
    """What a finished run leaves beside its metrics: plots, the confusion matrix, the method's
    outputs, the memory report and the adapter; returns the summary (not yet written)."""
    from hierfedlora.adapter import export_adapter
    from hierfedlora.plots import plot_accuracy, plot_confusion

    plot_accuracy(sim.rows, out / "accuracy.png", title=f"{sim.method} on {cfg.data.name}", key=key)
    confusion = sim.confusion_report()  # the final global model on the test split, from its last evaluation
    if confusion is not None:
        (out / "confusion.json").write_text(json.dumps(confusion, indent=2))
        plot_confusion(confusion["counts"], confusion["labels"], out / "confusion.png",
                       title=f"{sim.method} on {cfg.data.name}, round {confusion['round']}")
    sim.strategy.write_outputs(out, sim.rows)
    (out / "memory.json").write_text(json.dumps(sim.memory_report(), indent=2))
    if export:
        export_adapter(sim.state, sim.global_ranks, cfg.model.name, sim.model.target_modules, cfg.model.alpha,
                       sim.work.label_names, out / "adapter", seed=cfg.run.seed, task=cfg.task.kind)
    return sim.summary()


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """The summary as a table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{summary['method']} -> {out}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    fmt = {
        "final_acc": pct, "best_acc": pct, "zero_shot_score": pct, "final_score": pct,
        "sim_time_s": lambda v: f"{v / 60:.1f} min", "bytes_total": lambda v: f"{v / 1e6:.1f} MB",
        "time_to_target_s": lambda v: f"{v / 60:.1f} min", "wall_time_s": lambda v: f"{v:.0f} s",
        "budget_s": lambda v: f"{v / 60:.1f} min", "score_at_budget": pct,
    }
    for k, f in fmt.items():
        if k in summary:
            v = summary[k]
            name = f"{k} ({summary['score'][5:]})" if k.endswith("_score") and "score" in summary else k
            t.add_row(name, "not reached" if v is None else f(v))
    Console().print(t)
