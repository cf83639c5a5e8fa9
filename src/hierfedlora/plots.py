"""Plots people would rather look at than tables (matplotlib, headless)."""

from __future__ import annotations

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


def plot_accuracy(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Test accuracy vs. simulated time of one run."""
    ev = [r for r in rows if "test_acc" in r]
    x, label = time_axis([r["sim_time_s"] for r in ev])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [100 * r["test_acc"] for r in ev], marker="o", ms=3)
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
