"""Plots people would rather look at than tables (matplotlib, headless)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def time_axis(seconds: list[float]) -> tuple[list[float], str]:
    m = max(seconds, default=0.0)
    if m >= 7200:
        return [s / 3600 for s in seconds], "simulated time (h)"
    if m >= 120:
        return [s / 60 for s in seconds], "simulated time (min)"
    return list(seconds), "simulated time (s)"


SCORE_LABELS = {"test_acc": "test accuracy (%)", "test_rougeL": "test ROUGE-L (%)", "test_macro_f1": "test macro-F1 (%)"}


def plot_accuracy(rows: list[dict[str, Any]], path: str | Path, title: str = "", key: str = "test_acc") -> None:
    """Test accuracy (or the run's other score, `key`) vs. simulated time of one run."""
    ev = [r for r in rows if key in r]
    x, label = time_axis([r["sim_time_s"] for r in ev])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [100 * r[key] for r in ev], marker="o", ms=3)
    ax.set_xlabel(label)
    ax.set_ylabel(SCORE_LABELS.get(key, key))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, list[list[dict[str, Any]]]], x_key: str, path: str | Path, title: str,
                key: str = "test_acc") -> None:
    """Test accuracy (or score `key`) of each method (one line per seed, same colour) vs. simulated time or traffic."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_x = [r["sim_time_s"] for runs in curves.values() for rows in runs for r in rows]
    for i, (label, runs) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        for j, rows in enumerate(runs):
            ev = [r for r in rows if key in r]
            if x_key == "bytes":
                xs = [(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in ev]
            else:
                xs = time_axis([r["sim_time_s"] for r in ev] + [max(all_x, default=0)])[0][:-1]
            ax.plot(xs, [100 * r[key] for r in ev], color=colour, alpha=0.9 if j == 0 else 0.4,
                    label=label if j == 0 else None)
    ax.set_xlabel("traffic (MB, up + down)" if x_key == "bytes" else time_axis(all_x)[1])
    ax.set_ylabel(SCORE_LABELS.get(key, key))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def step_curve(rows: list[dict[str, Any]], key: str, grid: list[float]) -> list[float]:
    """The score a run has at each simulated time of `grid`: its last evaluation at or before it
    (NaN before its first evaluation and after its end)."""
    ev = [r for r in rows if key in r]
    end = max((r["sim_time_s"] for r in rows), default=0.0)
    out, i = [], -1
    for t in grid:
        while i + 1 < len(ev) and ev[i + 1]["sim_time_s"] <= t:
            i += 1
        out.append(float("nan") if i < 0 or t > end else ev[i][key])
    return out


def plot_bands(curves: dict[str, list[list[dict[str, Any]]]], path: str | Path, title: str, key: str = "test_acc",
               budget: float | None = None, points: int = 200) -> None:
    """Score vs. simulated time per method: the mean over seeds of what each seed has at that time
    (`step_curve`), a band of ± one std where there are several seeds, the budget as a line."""
    import numpy as np

    ends = [max((r["sim_time_s"] for r in rows), default=0.0) for runs in curves.values() for rows in runs]
    top = max(ends + [budget or 0.0], default=0.0)
    grid = [top * i / (points - 1) for i in range(points)]
    xs, unit = time_axis(grid)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, runs) in enumerate(curves.items()):
        ys = np.array([step_curve(rows, key, grid) for rows in runs]) * 100
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # columns before a seed's first evaluation
            alive = ~np.isnan(ys).any(0)  # where every seed is still running
            mean, sd = np.nanmean(ys, 0), np.nanstd(ys, 0, ddof=1) if len(runs) > 1 else np.zeros(len(grid))
        x = np.array(xs)
        ax.plot(x[alive], mean[alive], color=f"C{i % 10}", label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(x[alive], (mean - sd)[alive], (mean + sd)[alive], color=f"C{i % 10}", alpha=0.2)
    if budget is not None:
        ax.axvline(time_axis([budget, top])[0][0], color="k", ls="--", lw=1, label="budget")
    ax.set_xlabel(unit)
    ax.set_ylabel(SCORE_LABELS.get(key, key))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(values: dict[str, float | None], path: str | Path, title: str) -> None:
    """Bars of simulated time to target; methods that never reached it are marked."""
    labels = list(values)
    reached = [v for v in values.values() if v is not None]
    xs, unit = time_axis(reached)
    scale = (xs[0] / reached[0]) if reached and reached[0] else 1.0
    fig, ax = plt.subplots(figsize=(7, 4))
    heights = [(v or 0.0) * scale for v in values.values()]
    bars = ax.bar(labels, heights, color=[f"C{i % 10}" for i in range(len(labels))])
    for b, v in zip(bars, values.values()):
        if v is None:
            ax.annotate("not reached", (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def plot_confusion(counts: list[list[int]], labels: list[str], path: str | Path, title: str = "") -> None:
    """A confusion matrix as a heat map, rows = true class, columns = predicted; each cell is
    coloured by its share of its row (recall per class), so a small class's errors stay visible,
    and shows its count where the matrix is small enough to read."""
    import numpy as np

    c = np.asarray(counts, dtype=float)
    k = len(labels)
    share = c / np.maximum(c.sum(1, keepdims=True), 1)
    side = min(12.0, 3.0 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = list(range(k))
    short = [name if len(name) <= 14 else name[:13] + "…" for name in labels]
    ax.set_xticks(ticks, short, rotation=60 if k > 4 else 0, ha="right" if k > 4 else "center", fontsize=8)
    ax.set_yticks(ticks, short, fontsize=8)
    if k <= 20:
        for t in range(k):
            for q in range(k):
                ax.text(q, t, f"{int(c[t, q])}", ha="center", va="center", fontsize=7,
                        color="white" if share[t, q] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
