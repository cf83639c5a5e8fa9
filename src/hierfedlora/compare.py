"""Compare methods on the same data, partition, fleet and seeds, the way the papers do (design.md §5).

`hierfedlora compare CONFIG.toml --methods fedlora,hierfedlora --seeds 3 --out DIR` runs every
(method, seed) into DIR/<method>/seed<k> (finished runs are reused, interrupted ones resumed) and
writes DIR/report.md with plots. `hierfedlora report DIR` rebuilds the report from finished runs.

A method in `--methods` is a registered method name or a variant defined in the config file:

    [variants.hierfedlora-fixed-depth]   # an ablation, run as one more method
    name = "hierfedlora"
    fixed_depth = 6

Time and traffic to target are read off each run's evaluation rows: the first evaluated round whose
test accuracy reaches the target. The target defaults to 95% of FedLoRA's mean final accuracy (or,
without FedLoRA in the comparison, of the lowest method mean), so every method's "speed-up" is
measured to an accuracy the baseline actually reaches.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hierfedlora.config import ConfigError, ExperimentConfig, build_config, load_config

TARGET_FRACTION = 0.95


@dataclass
class Run:
    label: str
    seed: int
    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def key(self) -> str:
        """The run's score: test accuracy, or ROUGE-L for open-ended instruction data."""
        return self.summary.get("score", "test_acc")

    @property
    def final(self) -> float:
        return self.summary["final_score"] if "final_score" in self.summary else self.summary["final_acc"]

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if self.key in r]

    def to_target(self, target: float) -> tuple[float | None, int | None]:
        """(simulated seconds, bytes) when the score first reaches `target`, or (None, None)."""
        hit = next((r for r in self.evals if r[self.key] >= target), None)
        return (hit["sim_time_s"], hit["bytes_up"] + hit["bytes_down"]) if hit else (None, None)


def read_variants(config_path: str | Path | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(raw config without `variants`, {label: method table})."""
    if config_path is None:
        return {}, {}
    raw = tomllib.loads(Path(config_path).read_text())
    variants = raw.pop("variants", {})
    for label, table in variants.items():
        if "name" not in table:
            raise ConfigError(f"[variants.{label}] needs name = \"<method>\"")
    return raw, variants


def method_config(raw: dict[str, Any], variants: dict[str, dict[str, Any]], label: str, seed: int,
                  overrides: list[str]) -> ExperimentConfig:
    base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    base["method"] = dict(variants[label]) if label in variants else {"name": label}
    base.setdefault("run", {})["seed"] = seed
    return build_config(base, overrides)


def run_comparison(config_path: str | None, methods: list[str], seeds: int, out: Path, overrides: list[str],
                   progress: bool = True) -> Path:
    from hierfedlora.engine import CHECKPOINT, config_fingerprint
    from hierfedlora.experiment import run_experiment

    raw, variants = read_variants(config_path)
    # every (method, seed) config first: a bad method or setting fails before anything is trained
    configs = {(label, seed): method_config(raw, variants, label, seed, overrides) for label in methods for seed in range(seeds)}
    out.mkdir(parents=True, exist_ok=True)
    for (label, seed), cfg in configs.items():
        run_dir = out / label / f"seed{seed}"
        if (run_dir / "summary.json").exists() and (run_dir / "config.toml").exists():
            if config_fingerprint(load_config(run_dir / "config.toml")) == config_fingerprint(cfg):
                print(f"reusing finished run {run_dir}")
                continue
            raise ConfigError(f"{run_dir} holds a finished run of a different configuration; "
                              "move it away or pick another --out.")
        resume = (run_dir / CHECKPOINT).exists()
        run_experiment(cfg, run_dir, resume=resume, overwrite=not resume, progress=progress and cfg.run.progress)
    return write_report(load_runs([out]), out)


def load_runs(paths: list[Path]) -> list[Run]:
    """Finished runs under the given directories (a compare directory or run directories)."""
    runs = []
    for p in paths:
        for summary in sorted(Path(p).rglob("summary.json")):
            d = summary.parent
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
            s = json.loads(summary.read_text())
            cfg = tomllib.loads((d / "config.toml").read_text())
            label = d.parent.name if d.name.startswith("seed") else s.get("method", d.name)
            runs.append(Run(label, int(cfg.get("run", {}).get("seed", 0)), d, rows, s))
    if not runs:
        raise ValueError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.array(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def default_target(runs: list[Run]) -> float:
    by = _by_label(runs)
    finals = {lab: np.mean([r.final for r in rs]) for lab, rs in by.items()}
    base = finals.get("fedlora", min(finals.values()))
    return TARGET_FRACTION * float(base)


def _by_label(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r)
    return out


def table(runs: list[Run], target: float) -> list[dict[str, Any]]:
    """One row per method: final accuracy mean ± std, time/traffic to target, speed-up vs FedLoRA."""
    rows = []
    for label, rs in _by_label(runs).items():
        acc_m, acc_s = _mean_std([r.final for r in rs])
        hits = [r.to_target(target) for r in rs]
        times = [t for t, _ in hits if t is not None]
        traffic = [b for _, b in hits if b is not None]
        rows.append({
            "method": label, "seeds": len(rs), "final_acc_mean": acc_m, "final_acc_std": acc_s,
            "reached": f"{len(times)}/{len(rs)}",
            "time_to_target_s": float(np.mean(times)) if len(times) == len(rs) else None,
            "traffic_to_target_bytes": float(np.mean(traffic)) if len(traffic) == len(rs) else None,
            "sim_time_s": float(np.mean([r.summary["sim_time_s"] for r in rs])),
            "bytes_total": float(np.mean([r.summary["bytes_total"] for r in rs])),
        })
    base = next((r for r in rows if r["method"] == "fedlora"), None)
    for r in rows:
        ok = base and base["time_to_target_s"] and r["time_to_target_s"]
        r["speedup_vs_fedlora"] = base["time_to_target_s"] / r["time_to_target_s"] if ok else None
        okb = base and base["traffic_to_target_bytes"] and r["traffic_to_target_bytes"]
        r["traffic_saving_vs_fedlora"] = 1 - r["traffic_to_target_bytes"] / base["traffic_to_target_bytes"] if okb else None
    return rows


def _fmt(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return {"pct": f"{100 * v:.2f}", "s": f"{v:.1f}", "mb": f"{v / 1e6:.1f}", "x": f"{v:.2f}×",
            "save": f"{100 * v:.1f}%"}.get(kind, str(v))


def write_report(runs: list[Run], out: Path, target: float | None = None) -> Path:
    from hierfedlora import plots

    target = default_target(runs) if target is None else target
    rows = table(runs, target)
    (out / "table.json").write_text(json.dumps({"target_acc": target, "rows": rows}, indent=2))
    lines = [
        "# Method comparison", "",
        f"Target accuracy: {100 * target:.2f}% (default rule: {int(TARGET_FRACTION * 100)}% of FedLoRA's mean final accuracy).",
        "Times are simulated; traffic counts every byte up and down on every link.", "",
        "| method | seeds | final acc (%) | reached target | time to target (s) | traffic to target (MB) | speed-up vs FedLoRA | traffic saved vs FedLoRA | total sim time (s) | total traffic (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seeds']} | {_fmt(r['final_acc_mean'], 'pct')} ± {_fmt(r['final_acc_std'], 'pct')} | "
            f"{r['reached']} | {_fmt(r['time_to_target_s'], 's')} | {_fmt(r['traffic_to_target_bytes'], 'mb')} | "
            f"{_fmt(r['speedup_vs_fedlora'], 'x')} | {_fmt(r['traffic_saving_vs_fedlora'], 'save')} | "
            f"{_fmt(r['sim_time_s'], 's')} | {_fmt(r['bytes_total'], 'mb')} |")
    by = _by_label(runs)
    curves = {lab: [r.rows for r in rs] for lab, rs in by.items()}
    key = runs[0].key
    plots.plot_curves(curves, "sim_time_s", out / "accuracy_vs_time.png", "score vs. simulated time", key)
    plots.plot_curves(curves, "bytes", out / "accuracy_vs_traffic.png", "score vs. traffic", key)
    plots.plot_bars({r["method"]: r["time_to_target_s"] for r in rows}, out / "time_to_target.png",
                    f"simulated time to {100 * target:.1f}% accuracy")
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
