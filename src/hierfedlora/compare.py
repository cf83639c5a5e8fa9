"""Compare methods on the same data, partition, fleet and seeds, the way the papers do (design.md §5).

`hierfedlora compare CONFIG.toml --methods fedlora,hierfedlora --seeds 3 --out DIR` runs every
(method, seed) into DIR/<method>/seed<k> (finished runs are reused, interrupted ones resumed) and
writes DIR/report.md with plots. `hierfedlora report DIR` rebuilds the report from finished runs.

A method in `--methods` is a registered method name or a variant defined in the config file:

    [variants.hierfedlora-fixed-depth]   # an ablation, run as one more method
    name = "hierfedlora"
    fixed_depth = 6

**Equal budgets.** Methods finish the same number of rounds at very different simulated times, so
with `--budget SECONDS` every run goes until its simulated clock reaches the budget (`run.budget_s`;
its round cap is `--max-rounds`, by default 10 × `run.rounds`) and is scored by its last evaluation
at or before the budget. With `--budget auto` FedLoRA runs first, to its `run.rounds`, and the
budget is the simulated time by which its last three evaluations lie within one point
(`CONVERGED_SPAN`) in every seed; a seed where that never happens sets the budget to its end and is
flagged as not converged.

**Seeds.** Per method the report gives the score mean ± std and a 95% t-interval over seeds, the
paired difference to FedLoRA seed by seed with its interval, and time and traffic (WAN and LAN
apart) to a target with how many seeds reached it. The target defaults to 95% of FedLoRA's mean
score (or, without FedLoRA, of the lowest method mean), so every "speed-up" is measured to a score
the baseline reaches.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hierfedlora.config import ConfigError, ExperimentConfig, build_config, dump_config, load_config, read_toml
from hierfedlora import tracking
from hierfedlora.errors import RunDirError
from hierfedlora.tracking import Lineage

TARGET_FRACTION = 0.95
CONVERGED_SPAN = 0.01  # --budget auto: FedLoRA's last three evaluations within one point
CONFIDENCE = 0.95
BUDGET_ROUNDS_FACTOR = 10  # a budgeted run's round cap: this × run.rounds, unless --max-rounds


@dataclass
class Run:
    label: str
    seed: int
    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def key(self) -> str:
        """The run's score: test accuracy or macro-F1 (`run.metric`), or ROUGE-L for open-ended instruction data."""
        return self.summary.get("score", "test_acc")

    @property
    def final(self) -> float:
        return self.summary["final_score"] if "final_score" in self.summary else self.summary["final_acc"]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if self.key in r]

    def score_at(self, budget: float | None) -> float | None:
        """The last evaluation at or before `budget` simulated seconds (the final one without)."""
        if budget is None:
            return self.final
        at = [r for r in self.evals if r["sim_time_s"] <= budget]
        return at[-1][self.key] if at else None

    def reached_budget(self, budget: float | None) -> bool:
        return budget is None or self.summary["sim_time_s"] >= budget

    def to_target(self, target: float) -> dict[str, Any] | None:
        """The first evaluation row whose score reaches `target`, or None."""
        return next((r for r in self.evals if r[self.key] >= target), None)


def converged_at(run: Run, span: float = CONVERGED_SPAN) -> float | None:
    """Simulated time of the first evaluation after training started whose last three evaluations
    (it and the two before) lie within `span`; None if that never happens."""
    ev = [r for r in run.evals if r["round"] > 0]
    for i in range(2, len(ev)):
        window = [r[run.key] for r in ev[i - 2:i + 1]]
        if max(window) - min(window) <= span + 1e-12:  # one point, not one point plus rounding
            return float(ev[i]["sim_time_s"])
    return None


def auto_budget(baseline: list[Run]) -> tuple[float, list[int]]:
    """(budget, seeds that did not converge): the latest convergence time over the baseline's
    seeds; a seed that never converged counts with its whole run."""
    times, unconverged = [], []
    for r in baseline:
        t = converged_at(r)
        if t is None:
            unconverged.append(r.seed)
            t = float(r.summary["sim_time_s"])
        times.append(t)
    return max(times), sorted(unconverged)


def interval(xs: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float | None]:
    """(mean, sample std, half-width of the t confidence interval of the mean; None for one value)."""
    from scipy import stats

    a = np.asarray(xs, dtype=float)
    if len(a) < 2:
        return float(a.mean()), 0.0, None
    sd = float(a.std(ddof=1))
    return float(a.mean()), sd, float(stats.t.ppf(0.5 + confidence / 2, len(a) - 1) * sd / math.sqrt(len(a)))


def read_variants(config_path: str | Path | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(raw config without `variants`, {label: method table})."""
    if config_path is None:
        return {}, {}
    raw = read_toml(config_path)
    variants = raw.pop("variants", {})
    for label, table in variants.items():
        if "name" not in table:
            nested = [k for k, v in table.items() if isinstance(v, dict)]
            if nested:  # [variants.hfl-ldp-0.1] is the table "1" inside "hfl-ldp-0" for TOML
                raise ConfigError(f"[variants.{label}.{nested[0]}]: a variant's name cannot hold a dot unquoted (TOML reads "
                                  f"it as a table inside [variants.{label}]); quote it: "
                                  f"[variants.\"{label}.{nested[0]}\"]")
            raise ConfigError(f"[variants.{label}] needs name = \"<method>\"")
    return raw, variants


def method_config(raw: dict[str, Any], variants: dict[str, dict[str, Any]], label: str, seed: int,
                  overrides: list[str]) -> ExperimentConfig:
    base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    base["method"] = dict(variants[label]) if label in variants else {"name": label}
    base.setdefault("run", {})["seed"] = seed
    try:
        return build_config(base, overrides)
    except ConfigError as e:
        if label not in variants:
            raise
        raise ConfigError(f"[variants.{label}]: {e}") from None


def run_comparison(config_path: str | None, methods: list[str], seeds: int, out: Path, overrides: list[str],
                   progress: bool = True, budget: float | str | None = None, jobs: int = 1,
                   address: str | None = None, max_rounds: int | None = None) -> Path:
    """Run every (method, seed) into `out` and write its report; `budget`: simulated seconds, "auto"
    (module docstring) or None (every run to its rounds). With `jobs` > 1 or a Ray cluster
    `address`, the runs are Ray tasks, `jobs` at a time (`run_grid`); else one after another here."""
    raw, variants = read_variants(config_path)
    auto = budget == "auto"
    if auto and "fedlora" not in methods:
        raise ConfigError("--budget auto is set by FedLoRA's convergence: add fedlora to --methods, "
                          "or give the budget in simulated seconds (e.g. --budget 120).")
    # every (method, seed) config first: a bad method or setting fails before anything is trained
    configs = {(label, seed): method_config(raw, variants, label, seed, overrides) for label in methods for seed in range(seeds)}
    out.mkdir(parents=True, exist_ok=True)
    # with tracking.mlflow: an MLflow parent run the comparison's runs are nested under
    group = tracking.Comparison.open(next(iter(configs.values())), out)
    seconds = None if auto else budget
    # FedLoRA first where the budget waits for it; every other run after
    phases = [[k for k in configs if k[0] == "fedlora"], [k for k in configs if k[0] != "fedlora"]] if auto else [list(configs)]
    for phase in phases:
        if auto and seconds is None and phase and phase[0][0] != "fedlora":
            seconds = _auto(out, seeds)
        grid = []
        for label, seed in phase:
            cfg = configs[(label, seed)]
            if seconds is not None:  # the budget stops the run; its round cap only guards against a runaway
                cap = max_rounds or BUDGET_ROUNDS_FACTOR * cfg.run.rounds
                cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"budget_s": float(seconds), "rounds": cap})})
            grid.append((cfg, out / label / f"seed{seed}", group.lineage(label, seed) if group else None))
        if jobs > 1 or address:
            run_grid(grid, jobs, address)
        else:
            for cfg, run_dir, lin in grid:
                _run_one(cfg, run_dir, progress, lin)
    if auto and seconds is None:  # FedLoRA alone
        seconds = _auto(out, seeds)
    if seconds is not None:
        (out / "budget.json").write_text(json.dumps({"budget_s": seconds, "rule": "auto" if auto else "given"}))
    report = write_report(load_runs([out]), out)
    if group:
        group.finish()  # the report and its table and figures, on the parent run
    return report


def _ray_run(cfg_dict: dict[str, Any], run_dir: str, threads: int, lineage: Lineage | None) -> dict[str, Any]:
    """One run as a Ray task: in a worker process of its own, with `threads` torch threads unless
    the config sets them; returns the run's summary."""
    import torch

    cfg = build_config(cfg_dict)
    if not cfg.train.threads:
        torch.set_num_threads(threads)
    _run_one(cfg, Path(run_dir), progress=False, lineage=lineage)
    return json.loads((Path(run_dir) / "summary.json").read_text())


def run_grid(grid: list[tuple[ExperimentConfig, Path, Lineage | None]], jobs: int,
             address: str | None = None) -> None:
    """Run (config, run directory, tracking lineage) triples as Ray tasks: on this machine, `jobs` at
    a time (each with cores / jobs threads), or on the Ray cluster at `address` ("auto": the one this machine
    belongs to; `jobs` at a time per node), whose nodes must all see the run directories (a shared
    file system). Each task does exactly what the sequential path does (`_run_one`: reuse, extend,
    resume), so results are the same; the driver prints each run as it finishes."""
    import os

    try:
        import ray
    except ImportError:
        raise ConfigError("compare --jobs/--address runs the grid on Ray, which is not installed: "
                          'pip install -e ".[simulation]" (or run with --jobs 1).') from None
    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = {"address": address} if address else {"num_cpus": os.cpu_count() or 1}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
    try:
        # threads per run: this machine's cores / jobs; on a cluster, the smallest node's / jobs
        nodes = [n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")] or [1]
        per = max(1, int(min(nodes)) // jobs)
        task = ray.remote(num_cpus=per)(_ray_run)
        pending = {task.remote(cfg.to_dict(), str(run_dir), per, lin): run_dir for cfg, run_dir, lin in grid}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run_dir = pending.pop(ready[0])
            s = ray.get(ready[0])  # a failed run raises here, with its error
            done += 1
            score = s.get("score_at_budget", s.get("final_score", s.get("final_acc")))
            print(f"[{done}/{len(grid)}] {run_dir}: score {100 * score:.2f}% at {s['sim_time_s']:.1f} simulated s"
                  if score is not None else f"[{done}/{len(grid)}] {run_dir}: finished", flush=True)
    finally:
        if started:
            ray.shutdown()


def _auto(out: Path, seeds: int) -> float:
    seconds, unconverged = auto_budget([load_run(out / "fedlora" / f"seed{s}") for s in range(seeds)])
    print(f"budget: {seconds:.1f} simulated seconds, when FedLoRA's last three evaluations were within "
          f"{100 * CONVERGED_SPAN:.0f} point " + (f"(not converged in seed(s) {unconverged}: their whole run)"
                                                  if unconverged else "in every seed"))
    return seconds


def _run_one(cfg: ExperimentConfig, run_dir: Path, progress: bool, lineage: Lineage | None = None) -> None:
    """Run one (method, seed) into `run_dir`: a finished run of the same configuration is reused, or
    extended from its checkpoint when `cfg` stops later (more rounds, a larger budget); an
    interrupted one is resumed. `lineage`: its name and parent run in the tracking store."""
    from hierfedlora.engine import CHECKPOINT, config_fingerprint
    from hierfedlora.experiment import run_experiment

    show = progress and cfg.run.progress
    if (run_dir / "summary.json").exists() and (run_dir / "config.toml").exists():
        if config_fingerprint(load_config(run_dir / "config.toml")) != config_fingerprint(cfg):
            raise ConfigError(f"{run_dir} holds a finished run of a different configuration; "
                              "move it away or pick another --out.")
        done = json.loads((run_dir / "summary.json").read_text())
        budget = cfg.run.budget_s
        if done["rounds"] >= cfg.run.rounds or (budget is not None and done["sim_time_s"] >= budget):
            print(f"reusing finished run {run_dir}")
            return
        print(f"extending finished run {run_dir} (to {cfg.run.rounds} rounds"
              + (f" or {budget:.1f} simulated seconds)" if budget is not None else ")"))
        (run_dir / "summary.json").unlink()  # not finished while it runs on
        dump_config(cfg, run_dir / "config.toml")
        run_experiment(cfg, run_dir, resume=True, progress=show, lineage=lineage)
        return
    resume = (run_dir / CHECKPOINT).exists()
    old = run_dir / "config.toml"
    if resume and old.is_file() and config_fingerprint(load_config(old)) == config_fingerprint(cfg):
        dump_config(cfg, old)  # the same run; only its stopping rule may differ (else resuming refuses it)
    run_experiment(cfg, run_dir, resume=resume, overwrite=not resume, progress=show, lineage=lineage)


def _read(path: Path, parse: Callable[[str], Any]) -> Any:
    """`parse` of a run file's text, or a named error saying the file is missing or damaged."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; the run in {path.parent} is incomplete: resume or rerun it.") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSON, TOML and decoding errors are ValueErrors
        raise RunDirError(f"{path} is damaged ({e}); restore it, or rerun the run in {path.parent}.") from None


def _json_lines(text: str) -> list[Any]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"line {i}: {e}") from None
    return rows


def load_run(d: Path) -> Run:
    """The finished run in directory `d`."""
    if not (d / "summary.json").is_file():
        raise RunDirError(f"no finished run (summary.json) in {d}")
    rows = _read(d / "metrics.jsonl", _json_lines)
    s = _read(d / "summary.json", json.loads)
    cfg = _read(d / "config.toml", tomllib.loads)
    label = d.parent.name if d.name.startswith("seed") else s.get("method", d.name)
    return Run(label, int(cfg.get("run", {}).get("seed", 0)), d, rows, s)


def load_runs(paths: list[Path]) -> list[Run]:
    """Finished runs under the given directories (a compare directory or run directories)."""
    runs = [load_run(summary.parent) for p in paths for summary in sorted(Path(p).rglob("summary.json"))]
    if not runs:
        raise RunDirError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


def default_target(runs: list[Run], budget: float | None = None) -> float:
    by = _by_label(runs)
    scores = {lab: np.mean([r.score_at(budget) or 0.0 for r in rs]) for lab, rs in by.items()}
    base = scores.get("fedlora", min(scores.values()))
    return TARGET_FRACTION * float(base)


def _by_label(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r)
    return out


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def table(runs: list[Run], target: float, budget: float | None = None) -> list[dict[str, Any]]:
    """One row per method: its score (at the budget, or final) mean ± std with a 95% interval, the
    paired difference to FedLoRA, time and traffic to target (within the budget) over the seeds
    that reached it, and the totals."""
    by = _by_label(runs)
    base = {r.seed: r.score_at(budget) for r in by.get("fedlora", [])}
    rows = []
    for label, rs in by.items():
        scores = [r.score_at(budget) for r in rs]
        m, sd, ci = interval([x for x in scores if x is not None] or [float("nan")])
        diffs = [x - base[r.seed] for r, x in zip(rs, scores) if x is not None and base.get(r.seed) is not None]
        dm, _, dci = interval(diffs) if diffs and label != "fedlora" else (None, None, None)
        hits = [h for h in (r.to_target(target) for r in rs) if h is not None
                and (budget is None or h["sim_time_s"] <= budget)]
        rows.append({
            "method": label, "seeds": len(rs), "score_mean": m, "score_std": sd, "score_ci95": ci,
            "diff_vs_fedlora_mean": dm, "diff_vs_fedlora_ci95": dci, "paired_seeds": len(diffs) if dm is not None else 0,
            "reached": f"{len(hits)}/{len(rs)}",
            "time_to_target_s": _mean([h["sim_time_s"] for h in hits]),
            "traffic_to_target_bytes": _mean([h["bytes_up"] + h["bytes_down"] for h in hits]),
            "wan_to_target_bytes": _mean([h.get("bytes_wan", 0) for h in hits]),
            "lan_to_target_bytes": _mean([h.get("bytes_lan", 0) for h in hits]),
            "sim_time_s": float(np.mean([r.summary["sim_time_s"] for r in rs])),
            "bytes_total": float(np.mean([r.summary["bytes_total"] for r in rs])),
            "stopped_before_budget": [r.seed for r in rs if not r.reached_budget(budget)],
            "not_converged_at_budget": [r.seed for r in rs if budget is not None
                                        and _or_inf(converged_at(r)) > budget],
        })
    fed = next((r for r in rows if r["method"] == "fedlora"), None)
    for r in rows:
        ok = fed and fed["time_to_target_s"] and r["time_to_target_s"]
        r["speedup_vs_fedlora"] = fed["time_to_target_s"] / r["time_to_target_s"] if ok else None
        okb = fed and fed["wan_to_target_bytes"] and r["wan_to_target_bytes"] is not None
        r["wan_saving_vs_fedlora"] = 1 - r["wan_to_target_bytes"] / fed["wan_to_target_bytes"] if okb else None
    return rows


def _fmt(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return {"pct": f"{100 * v:.2f}", "pp": f"{100 * v:+.2f}", "s": f"{v:.1f}", "mb": f"{v / 1e6:.1f}",
            "x": f"{v:.2f}×", "save": f"{100 * v:.1f}%"}.get(kind, str(v))


def _pm(mean: float | None, half: float | None, kind: str) -> str:
    return _fmt(mean, kind) + (f" ± {100 * half:.2f}" if half is not None and mean is not None else "")


def _or_inf(t: float | None) -> float:
    return math.inf if t is None else t


def read_budget(out: Path) -> tuple[float | None, str]:
    """(budget, how it was set) of a compare directory (`budget.json`), or the runs' own budget."""
    p = out / "budget.json"
    if p.is_file():
        b = _read(p, json.loads)
        return float(b["budget_s"]), b.get("rule", "given")
    return None, ""


def write_report(runs: list[Run], out: Path, target: float | None = None) -> Path:
    """report.md, table.json and the figures of `runs` in `out`; the budget is the comparison's
    (budget.json), else the one every run ran under, else none."""
    from hierfedlora import plots

    keys = sorted({r.key for r in runs})
    if len(keys) > 1:  # a table of means over runs scored by different metrics would mean nothing
        raise ConfigError(f"these runs are scored by different metrics ({', '.join(keys)}); compare runs with one "
                          "run.metric.")
    key = keys[0]
    budget, rule = read_budget(out)
    if budget is None:  # runs that all ran under one budget of their own
        own = {r.summary.get("budget_s") for r in runs}
        budget = own.pop() if len(own) == 1 and None not in own else None
    scored = f"score at the budget ({budget:.1f} simulated s)" if budget is not None else "final score"
    if target is None:
        of = "FedLoRA's" if any(r.label == "fedlora" for r in runs) else "the lowest-scoring method's (no FedLoRA here)"
        target_rule = f"default rule: {int(TARGET_FRACTION * 100)}% of {of} mean {scored}"
        target = default_target(runs, budget)
    else:
        target_rule = "given"
    rows = table(runs, target, budget)
    (out / "table.json").write_text(json.dumps({"target_acc": target, "budget_s": budget, "rows": rows}, indent=2))
    lines = ["# Method comparison", ""]
    flags = [f"- **{r['method']} has not converged at the budget** in seed(s) {r['not_converged_at_budget']} "
             f"(its last three evaluations before it span more than {100 * CONVERGED_SPAN:.0f} point): its score there "
             "is still rising or swinging." for r in rows if r["not_converged_at_budget"] and r["method"] == "fedlora"]
    flags += [f"- {r['method']} stopped at its round cap before the budget in seed(s) {r['stopped_before_budget']}: "
              "raise run.rounds." for r in rows if r["stopped_before_budget"]]
    if flags:
        lines += ["**Read with care:**", ""] + flags + [""]
    if budget is not None:
        how = (f"auto: FedLoRA's last three evaluations within {100 * CONVERGED_SPAN:.0f} point by then in every seed, "
               "or its whole run where not") if rule == "auto" else "given"
        lines.append(f"Budget: {budget:.1f} simulated seconds ({how}). Every method is scored by its last evaluation "
                     "at or before the budget.")
    lines += [
        f"Score: {plots.SCORE_LABELS.get(key, key).removesuffix(' (%)')}.",
        f"Target: {100 * target:.2f}% ({target_rule}).",
        f"Intervals: {int(CONFIDENCE * 100)}% t-intervals over seeds; the difference to FedLoRA is paired by seed.",
        "Times are simulated; traffic counts every byte up and down (WAN: device/aggregator to the PS; LAN: within a group).", "",
        f"| method | seeds | {scored} (%) | vs FedLoRA (points) | reached target | time to target (s) | WAN to target (MB) | "
        "LAN to target (MB) | speed-up vs FedLoRA | WAN saved vs FedLoRA | total sim time (s) | total traffic (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seeds']} | {_pm(r['score_mean'], r['score_ci95'], 'pct')} | "
            f"{_pm(r['diff_vs_fedlora_mean'], r['diff_vs_fedlora_ci95'], 'pp')} | {r['reached']} | "
            f"{_fmt(r['time_to_target_s'], 's')} | {_fmt(r['wan_to_target_bytes'], 'mb')} | "
            f"{_fmt(r['lan_to_target_bytes'], 'mb')} | {_fmt(r['speedup_vs_fedlora'], 'x')} | "
            f"{_fmt(r['wan_saving_vs_fedlora'], 'save')} | {_fmt(r['sim_time_s'], 's')} | {_fmt(r['bytes_total'], 'mb')} |")
    by = _by_label(runs)
    curves = {lab: [r.rows for r in rs] for lab, rs in by.items()}
    plots.plot_bands(curves, out / "accuracy_vs_time.png", "score vs. simulated time (mean ± std over seeds)", key,
                     budget=budget)
    plots.plot_curves(curves, "bytes", out / "accuracy_vs_traffic.png", "score vs. traffic", key)
    plots.plot_bars({r["method"]: r["time_to_target_s"] for r in rows}, out / "time_to_target.png",
                    f"simulated time to {100 * target:.1f}% {plots.SCORE_LABELS.get(key, key).removesuffix(' (%)')}")
    lines += ["", "![accuracy vs time](accuracy_vs_time.png)", "![accuracy vs traffic](accuracy_vs_traffic.png)",
              "![time to target](time_to_target.png)"]
    from hierfedlora.strategies.registry import available

    methods = available()
    for lab, rs in by.items():  # method-specific figures of each method's first seed
        entry = methods.get(rs[0].summary.get("method", ""))
        for name in entry.strategy.report_figures(rs[0].rows, out, lab) if entry else []:
            lines.append(f"![{lab}]({name})")
    lines += ["", "Runs:", ""] + [f"- {r.label} seed {r.seed}: `{r.path}`" for r in runs]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
