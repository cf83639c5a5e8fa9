"""Command line: `hierfedlora run [CONFIG.toml] [--set key=value ...] [--out DIR]`, `--resume DIR`,
`compare`, `report`, `flower`, `generate RUN_DIR` to try an instruction-tuned adapter, and `calibrate`
to measure this machine as a fleet-file device."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from hierfedlora.errors import AdapterError, ConfigError, RunDirError, UserError
from hierfedlora.experiment import default_out, print_summary, run_experiment, select_run


def cmd_run(args: argparse.Namespace) -> int:
    cfg, out = select_run(args.config, args.set, args.out, args.resume, args.overwrite)
    summary = run_experiment(cfg, out, overwrite=args.overwrite, resume=bool(args.resume),
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
    c.add_argument("--budget", help="equal simulated-time budget: SECONDS, or 'auto' (when FedLoRA has converged)")
    c.add_argument("--max-rounds", type=int, help="round cap of budgeted runs (default: 10 x run.rounds; the budget stops them)")
    c.add_argument("--jobs", type=int, default=1, help="runs at once, as Ray tasks in parallel processes (default 1: one after another here)")
    c.add_argument("--address", help="run the grid on this Ray cluster ('auto': the one this machine joined); run directories must be on a file system every node sees")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)

    rp = sub.add_parser("report", help="rebuild a comparison report from finished runs")
    rp.add_argument("dirs", nargs="+", help="a compare directory, or run directories")
    rp.add_argument("--out", help="where report.md goes (default: the first directory)")
    rp.add_argument("--target", type=float, help="target accuracy (default: 95%% of FedLoRA's final accuracy)")
    rp.set_defaults(func=cmd_report)

    k = sub.add_parser("calibrate", help="measure this machine's training speed and memory; write a fleet file")
    k.add_argument("--model", default="minilm", help="model whose training is timed (model.name; default minilm)")
    k.add_argument("--out", default="fleet-calibrated.toml", help="fleet file to write (default: fleet-calibrated.toml)")
    k.add_argument("--batch-size", type=int, default=16, help="batch of the timed local steps (train.batch_size)")
    k.add_argument("--max-length", type=int, default=64, help="tokens per example (model.max_length)")
    k.add_argument("--rank", type=int, default=8, help="LoRA rank in every layer (model.rank)")
    k.add_argument("--steps", type=int, default=4, help="local steps per timed job")
    k.add_argument("--repeats", type=int, default=3, help="timed jobs (their median counts; one untimed warm-up first)")
    k.add_argument("--device", default="cpu", help="where to compute: cpu, cuda, cuda:N")
    k.add_argument("--kind", default="calibrated", help="the device's kind in the fleet file (free text)")
    k.add_argument("--count", type=int, default=1, help="how many such devices the file describes")
    k.add_argument("--wan-up-mbps", type=float, default=10.0, help="WAN upload to the server (not measured)")
    k.add_argument("--wan-down-mbps", type=float, help="WAN download (default: 2x upload; not measured)")
    k.add_argument("--wan-latency-ms", type=float, default=50.0, help="WAN latency (not measured)")
    k.set_defaults(func=cmd_calibrate)

    g = sub.add_parser("generate", help="try an instruction-tuned run's adapter: answer prompts with it")
    g.add_argument("run_dir", help="a run directory (its adapter/) or an adapter directory")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); none: read prompts from stdin, one per line")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per answer (greedy)")
    g.set_defaults(func=cmd_generate)

    from hierfedlora.flower import command as flower_command

    f = sub.add_parser("flower", help="run one experiment across Flower SuperNodes on this machine (docs/flower.md)")
    add_experiment_arguments(f, "runs/<config name>-flower", what="Flower run")
    flower_command.add_arguments(f)  # `hierfedlora flower`: the same experiment across Flower SuperNodes
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    from hierfedlora.compare import run_comparison

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--methods '{args.methods}' names no method; give e.g. --methods fedlora,hierfedlora")
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    out = Path(args.out) if args.out else default_out(args.config, prefix="compare-")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"comparison directory '{out}' is a file, not a directory; pick another --out.")
    budget = args.budget
    if budget is not None and budget != "auto":
        try:
            budget = float(budget)
        except ValueError:
            budget = -1.0
        if not math.isfinite(budget) or budget <= 0:
            raise ConfigError(f"--budget '{args.budget}' is neither simulated seconds (> 0) nor 'auto'; "
                              "e.g. --budget 120 or --budget auto")
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    if args.max_rounds is not None and args.max_rounds < 1:
        raise ConfigError("--max-rounds must be at least 1")
    report = run_comparison(args.config, methods, args.seeds, out, args.set, progress=not args.quiet, budget=budget,
                            jobs=args.jobs, address=args.address, max_rounds=args.max_rounds)
    print(report.read_text())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hierfedlora.compare import load_runs, write_report

    dirs = [Path(d) for d in args.dirs]
    out = Path(args.out) if args.out else dirs[0]
    runs = load_runs(dirs)  # before anything is created: no runs, no report directory
    out.mkdir(parents=True, exist_ok=True)
    report = write_report(runs, out, args.target)
    print(report.read_text())
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from hierfedlora.calibrate import fleet_file_text, measure

    for name in ("batch_size", "max_length", "rank", "steps", "repeats", "count"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1.")
    if args.wan_up_mbps <= 0 or (args.wan_down_mbps is not None and args.wan_down_mbps <= 0) or args.wan_latency_ms < 0:
        raise ConfigError("--wan-up-mbps / --wan-down-mbps must be > 0 and --wan-latency-ms >= 0.")
    out = Path(args.out)
    if out.is_dir():
        raise RunDirError(f"--out '{out}' is a directory; give the fleet file's path, e.g. {out / 'fleet.toml'}.")
    if not out.parent.is_dir():
        raise RunDirError(f"--out '{out}': folder '{out.parent}' does not exist; create it or pick another path.")
    from hierfedlora.device.model import resolve_device

    m = measure(args.model, args.batch_size, args.max_length, args.rank, args.steps, args.repeats,
                resolve_device(args.device))
    out.write_text(fleet_file_text(m, args.kind, args.count, args.wan_up_mbps, args.wan_down_mbps, args.wan_latency_ms))
    print(f"{m.model} on {m.device}: {m.flops / 1e9:.1f} GFLOP/s sustained training, {m.memory_gb:.1f} GB free -> {out}")
    print(f"use it: hierfedlora run --set fleet.name={out} --set fleet.num_devices={args.count}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from hierfedlora import instruct
    from hierfedlora.adapter import load_adapter

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: generate at least 1 token.")
    d = Path(args.run_dir)
    d = d / "adapter" if (d / "adapter" / "hierfedlora.json").is_file() else d
    if not (d / "hierfedlora.json").is_file():
        raise AdapterError(f"'{args.run_dir}' holds no exported adapter (no adapter/hierfedlora.json); give a finished "
                         "run directory or its adapter/ folder.")
    model, tok, _ = load_adapter(d)
    if not getattr(model, "can_generate", lambda: False)() or model.get_output_embeddings() is None:
        raise AdapterError(f"the adapter in '{d}' is a classifier, not an instruction-tuned causal LM (task.kind = "
                         "\"instruction\"); there is nothing to generate.")
    eot = instruct.end_of_turn(tok)
    prompts = args.prompt or None
    interactive = prompts is None
    if interactive:
        print("prompt (one per line, Ctrl-D ends):", file=sys.stderr)
    for prompt in prompts or sys.stdin:
        prompt = prompt.strip()
        if not prompt:
            continue
        ids = tok(instruct.prompt_text(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, eos_token_id=eot, pad_token_id=tok.pad_token_id)
        print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:  # the one place a user's mistake becomes a message (errors.py)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
