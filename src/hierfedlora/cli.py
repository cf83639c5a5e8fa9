"""Command line: `hierfedlora run [CONFIG.toml] [--set key=value ...] [--out DIR]`, `--resume DIR`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hierfedlora.config import ConfigError, ExperimentConfig, load_config


def default_out(config_path: str | None) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def run_experiment(cfg: ExperimentConfig, out: Path, *, overwrite: bool = False, resume: bool = False,
                   progress: bool = True, export: bool = True, executor=None) -> dict[str, Any]:
    """Run (or resume) one experiment into `out`; returns its summary. `executor` runs the devices'
    jobs (default: in this process; `hierfedlora.flower` passes one that uses SuperNodes)."""
    from tqdm.auto import tqdm

    from hierfedlora.adapter import export_adapter
    from hierfedlora.engine import CHECKPOINT, Simulation, prepare_run_dir
    from hierfedlora.plots import plot_accuracy

    if not resume:
        prepare_run_dir(cfg, out, overwrite)
    t0 = time.perf_counter()
    sim = Simulation(cfg, out, executor=executor)
    if resume and (out / CHECKPOINT).exists():
        sim.load_checkpoint(out / CHECKPOINT)
    bar = tqdm(total=cfg.run.rounds, initial=sim.round, desc=sim.method, unit="round",
               disable=not progress, dynamic_ncols=True)
    last_acc: list[float] = []

    def on_round(row: dict[str, Any]) -> None:
        if "test_acc" in row:
            last_acc[:] = [row["test_acc"]]
        if row["round"] > 0:
            bar.update(1)
        post = {"sim": f"{row['sim_time_s'] / 60:.1f}min"}
        if last_acc:
            post["acc"] = f"{100 * last_acc[0]:.1f}%"
        bar.set_postfix(post)

    sim.run(on_round)
    bar.close()
    summary = sim.summary()
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_accuracy(sim.rows, out / "accuracy.png", title=f"{sim.method} on {cfg.data.name}")
    if hasattr(sim.strategy, "write_outputs"):
        sim.strategy.write_outputs(out, sim.rows)
    if export:
        export_adapter(sim.state, sim.global_ranks, cfg.model.name, cfg.model.target_modules, cfg.model.alpha,
                       sim.work.label_names, out / "adapter", seed=cfg.run.seed)
    return summary


def print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{summary['method']} -> {out}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    fmt = {
        "final_acc": lambda v: f"{100 * v:.2f}%", "best_acc": lambda v: f"{100 * v:.2f}%",
        "sim_time_s": lambda v: f"{v / 60:.1f} min", "bytes_total": lambda v: f"{v / 1e6:.1f} MB",
        "time_to_target_s": lambda v: f"{v / 60:.1f} min", "wall_time_s": lambda v: f"{v:.0f} s",
    }
    for k, f in fmt.items():
        if k in summary:
            v = summary[k]
            t.add_row(k, "not reached" if v is None else f(v))
    Console().print(t)


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        out = Path(args.resume)
        cfg_path = out / "config.toml"
        if not cfg_path.is_file():
            raise ConfigError(f"'{out}' is not a run directory (no config.toml); pass the directory a run wrote.")
        if args.config or args.set:
            raise ConfigError("--resume takes the run's own config.toml; drop the CONFIG and --set arguments.")
        cfg = load_config(cfg_path)
        resume = True
    else:
        cfg = load_config(args.config, args.set)
        out = Path(args.out) if args.out else default_out(args.config)
        resume = False
    summary = run_experiment(cfg, out, overwrite=args.overwrite, resume=resume,
                             progress=cfg.run.progress and not args.quiet)
    print_summary(summary, out)
    return 0


def add_experiment_arguments(p: argparse.ArgumentParser, out_default: str, what: str = "run") -> None:
    """The arguments every command that runs one experiment takes (`run`, `flower`)."""
    p.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. train.lr=5e-4")
    p.add_argument("--out", help=f"run directory (default: {out_default})")
    p.add_argument("--resume", metavar="DIR", help=f"continue the {what} in DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hierfedlora", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="simulate one experiment")
    add_experiment_arguments(r, "runs/<config name>")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="run several methods on the same setting and write a report")
    c.add_argument("config", nargs="?", help="TOML config; [variants.NAME] tables define extra methods (ablations)")
    c.add_argument("--methods", default="fedlora,hetlora,flexlora,legend,hierfedlora",
                   help="comma-separated method names or variant names")
    c.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per method")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting for every run")
    c.add_argument("--out", help="comparison directory (default: runs/compare-<config name>)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)

    rp = sub.add_parser("report", help="rebuild a comparison report from finished runs")
    rp.add_argument("dirs", nargs="+", help="a compare directory, or run directories")
    rp.add_argument("--out", help="where report.md goes (default: the first directory)")
    rp.add_argument("--target", type=float, help="target accuracy (default: 95%% of FedLoRA's final accuracy)")
    rp.set_defaults(func=cmd_report)

    from hierfedlora.flower.command import add_parser as add_flower_parser

    add_flower_parser(sub)  # `hierfedlora flower`: the same experiment across Flower SuperNodes
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    from hierfedlora.compare import run_comparison

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    out = Path(args.out) if args.out else Path("runs") / f"compare-{Path(args.config).stem if args.config else 'default'}"
    report = run_comparison(args.config, methods, args.seeds, out, args.set, progress=not args.quiet)
    print(report.read_text())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hierfedlora.compare import load_runs, write_report

    dirs = [Path(d) for d in args.dirs]
    out = Path(args.out) if args.out else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    report = write_report(load_runs(dirs), out, args.target)
    print(report.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
