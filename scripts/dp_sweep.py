"""Accuracy against privacy: FedLoRA and HierFedLoRA under client-level DP (docs/privacy.md).

    python scripts/dp_sweep.py [CONFIG] --out runs/dp_sweep [--methods fedlora,hierfedlora]
        [--modes central,local] [--sigmas 0,0.5,1,2,4] [--clip-norm 1.0] [--seeds 3] [--set KEY=VALUE ...]

Runs every method × mode × σ × seed of CONFIG (with the --set overrides) into OUT/runs/, plus each
method without DP as the reference, then writes OUT/dp_sweep.csv and OUT/dp_sweep.json (one row per
method, mode and σ: ε at δ of the worst device, accuracy mean ± std over seeds, the mean update
norm before clipping and the fraction clipped) and OUT/accuracy_vs_epsilon.png (one line per method
and mode; x = ε on a log scale, with σ = 0, i.e. ε = ∞, at the right edge; the runs without DP as
dashed lines). Accuracy is the final test accuracy, or with run.budget_s the score at the budget.

Choosing C: the runs report `dp_update_norm` (the mean norm of the updates before clipping); C near
the typical norm clips some updates and keeps the noise σC small. The default 1.0 is about the
norm of tiny runs' updates; check the table's update_norm column for yours. A finished run
(summary.json present) is reused, so an interrupted sweep picks up where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from hierfedlora.config import load_config
from hierfedlora.experiment import run_experiment

COLUMNS = ("method", "mode", "sigma", "clip_norm", "epsilon", "delta", "acc_mean", "acc_std", "seeds",
           "update_norm", "clipped_fraction")


def run_one(config: str | None, sets: list[str], out: Path) -> dict[str, Any]:
    """One run's summary and its mean update norm / clipped fraction over rounds (None without DP)."""
    if not (out / "summary.json").exists():
        run_experiment(load_config(config, sets), out, overwrite=out.exists(), progress=False, export=False)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    norms = [r["dp_update_norm"] for r in rows if r.get("dp_update_norm") is not None]
    clipped = [r["dp_clipped_fraction"] for r in rows if r.get("dp_clipped_fraction") is not None]
    summary["update_norm"] = statistics.fmean(norms) if norms else None
    summary["clipped_fraction"] = statistics.fmean(clipped) if clipped else None
    return summary


def accuracy(summary: dict[str, Any]) -> float:
    """The score at the budget when the run had one, else the final test accuracy."""
    at = summary.get("score_at_budget")
    return float(at if at is not None else summary["final_acc"])


def table_row(method: str, mode: str, sigma: float | None, clip: float | None, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """mean ± std of accuracy over seeds; ε of the worst device (the same for every seed of a schedule: the max)."""
    accs = [accuracy(s) for s in runs]
    eps = [math.inf if s.get("dp_epsilon") is None else s["dp_epsilon"] for s in runs] if mode != "off" else [None]
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    return {"method": method, "mode": mode, "sigma": sigma, "clip_norm": clip,
            "epsilon": None if eps[0] is None else max(eps), "delta": runs[0].get("dp_delta"),
            "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seeds": len(accs), "update_norm": mean([s["update_norm"] for s in runs if s["update_norm"] is not None]),
            "clipped_fraction": mean([s["clipped_fraction"] for s in runs if s["clipped_fraction"] is not None])}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs ε, one line per method × mode; ε = ∞ (σ = 0) drawn at the right edge."""
    import hierfedlora.plots  # noqa: F401 - selects the headless backend
    import matplotlib.pyplot as plt

    finite = [r["epsilon"] for r in rows if r["epsilon"] is not None and math.isfinite(r["epsilon"]) and r["epsilon"] > 0]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 1.0)
    inf_x = hi * 4  # where ε = ∞ is drawn
    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {"central": ("-", "o"), "local": (":", "s")}  # colour: the method; line and marker: the mode
    for j, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        color = f"C{j}"
        for mode in dict.fromkeys(r["mode"] for r in rows if r["method"] == method and r["mode"] != "off"):
            pts = sorted((inf_x if math.isinf(r["epsilon"]) else r["epsilon"], 100 * r["acc_mean"], 100 * r["acc_std"])
                         for r in rows if r["method"] == method and r["mode"] == mode)
            ls, marker = style.get(mode, ("-", "o"))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], color=color, ls=ls,
                        marker=marker, capsize=3, label=f"{method}, {mode} DP")
        for r in rows:
            if r["method"] == method and r["mode"] == "off":
                ax.axhline(100 * r["acc_mean"], ls="--", lw=1, color=color, alpha=0.6, label=f"{method}, no DP")
    ax.set_xscale("log")
    ax.set_xlim(lo / 2, inf_x * 2)
    ticks = [t for t in ax.get_xticks() if lo / 2 <= t <= hi * 2]
    ax.set_xticks(ticks + [inf_x], [f"{t:g}" for t in ticks] + ["∞"])
    delta = next((r["delta"] for r in rows if r["delta"] is not None), None)
    ax.set_xlabel(f"ε at δ = {delta:g} (worst device)" if delta is not None else "ε")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs. privacy (client-level DP of the updates)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help="experiment config (.toml); the defaults when left out")
    ap.add_argument("--out", default="runs/dp_sweep")
    ap.add_argument("--methods", default="fedlora,hierfedlora")
    ap.add_argument("--modes", default="central,local")
    ap.add_argument("--sigmas", default="0,0.5,1,2,4", help="noise multipliers σ (0: clipping only, ε = ∞)")
    ap.add_argument("--clip-norm", type=float, default=1.0, help="C (see dp_update_norm of a short run)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    methods, modes = a.methods.split(","), a.modes.split(",")
    sigmas = [float(s) for s in a.sigmas.split(",")]
    base_seed = load_config(a.config, a.sets).run.seed
    rows = []
    for method in methods:
        for mode, sigma in [("off", None)] + [(m, s) for m in modes for s in sigmas]:
            runs = []
            for i in range(a.seeds):
                sets = [*a.sets, f'method.name="{method}"', f"run.seed={base_seed + i}"]
                name = f"{method}_off" if mode == "off" else f"{method}_{mode}_sigma{sigma:g}_C{a.clip_norm:g}"
                if mode != "off":
                    sets += [f'privacy.dp="{mode}"', f"privacy.clip_norm={a.clip_norm!r}", f"privacy.noise_multiplier={sigma!r}"]
                runs.append(run_one(a.config, sets, out / "runs" / f"{name}_seed{base_seed + i}"))
            rows.append(table_row(method, mode, sigma, None if mode == "off" else a.clip_norm, runs))
            r = rows[-1]
            print(f"{method:12s} {mode:8s} σ={'-' if sigma is None else f'{sigma:g}':4s} ε={r['epsilon']}  "
                  f"acc={100 * r['acc_mean']:.1f}±{100 * r['acc_std']:.1f}%  update norm={r['update_norm']}", flush=True)
    with open(out / "dp_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    # JSON has no ∞: ε = ∞ (σ = 0) is written as the string "inf"
    (out / "dp_sweep.json").write_text(json.dumps(
        [{**r, "epsilon": "inf" if r["epsilon"] is not None and math.isinf(r["epsilon"]) else r["epsilon"]} for r in rows],
        indent=2))
    plot(rows, out / "accuracy_vs_epsilon.png")
    print(f"wrote {out / 'dp_sweep.csv'}, {out / 'dp_sweep.json'}, {out / 'accuracy_vs_epsilon.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
