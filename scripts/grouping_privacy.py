"""How good is HierFedLoRA's grouping when the server never sees a raw label histogram?
(issue #20 item 1; docs/privacy.md "Private grouping")

    python scripts/grouping_privacy.py --out runs/grouping_privacy [--seeds 0 1 2] [configs/paper/*.toml]

For each config (default: the four in configs/paper/) and seed, builds the run's set-up exactly as
`hierfedlora run` does with method.name = "hierfedlora" (data, partition, fleet, predicted round
times; `engine.Simulation`, no training), then groups the devices from each input and measures
Σ_k KL(P_k‖P) with the TRUE histograms: exact greedy, random groups, LDP and pooled sums at
ε ∈ {0.1, 1, 10, ∞}, label-free embedding sketches. Writes table.md (mean ± std over seeds),
results.json and kl_vs_epsilon.png into --out. Cheap: set-up and grouping only (minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hierfedlora.config import load_config
from hierfedlora.engine import Simulation
from hierfedlora.grouping import group_by, group_devices, pooled_kl, random_groups
from hierfedlora.private_grouping import ldp_histograms, pooled_grouping, random_projection, sketch_statistic

EPSILONS = [0.1, 1.0, 10.0, None]  # None = ∞


def _eps_name(e: float | None) -> str:
    return "inf" if e is None else f"{e:g}"


def measure(path: str, seed: int) -> dict[str, float]:
    """Σ KL(P_k‖P) (true histograms) of each grouping input for one config and seed."""
    cfg = load_config(path, [f"run.seed={seed}", 'method.name="hierfedlora"', "train.workers=1"])
    sim = Simulation(cfg)
    st, su = sim.strategy, sim.setup
    s = st.s
    hists = su.label_hists
    args = (st.device_round_s, s.num_groups, s.grouping_lambda, s.size_slack, seed, s.grouping_passes)

    def kl(groups: list[list[int]]) -> float:
        return float(sum(pooled_kl(hists, g) for g in groups))

    out = {"exact": kl(group_devices(hists, *args)), "random": kl(random_groups(su.num_devices, s.num_groups, seed))}
    for e in EPSILONS:
        out[f"ldp@{_eps_name(e)}"] = kl(group_devices(ldp_histograms(hists, e, seed), *args))
        out[f"pooled@{_eps_name(e)}"] = kl(pooled_grouping(hists, *args, epsilon=e).groups)
    sketches = random_projection(su.device_embeddings(), s.sketch_dim, seed)
    out["embeddings"] = kl(group_by(sketch_statistic(sketches, su.num_examples), *args))
    sim.executor.close()
    return out


def table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    keys = list(next(iter(next(iter(results.values())).values())))
    names = [Path(c).stem for c in results]
    lines = ["| grouping input | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        cells = []
        for c in results:
            v = np.array([results[c][sd][k] for sd in results[c]])
            cells.append(f"{v.mean():.2e} ± {v.std():.1e}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[int, dict[str, float]]], path: Path) -> None:
    import hierfedlora.plots  # noqa: F401 - selects the headless backend
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), squeeze=False)
    xs = [0.1, 1.0, 10.0, 100.0]  # ∞ drawn at 100
    for ax, (c, per_seed) in zip(axes[0], results.items()):
        def mean(k: str) -> float:
            return float(np.mean([r[k] for r in per_seed.values()]))

        for variant in ("ldp", "pooled"):
            ax.plot(xs, [mean(f"{variant}@{_eps_name(e)}") for e in EPSILONS], marker="o", label=variant)
        for k, style in (("exact", "k--"), ("random", "r:"), ("embeddings", "g-.")):
            ax.axhline(mean(k), color=style[0], ls=style[1:], label=k)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs, ["0.1", "1", "10", "∞"])
        ax.set_xlabel("ε")
        ax.set_title(Path(c).stem, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Σ_k KL(P_k‖P), true histograms")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", default=sorted(str(p) for p in Path("configs/paper").glob("*.toml")))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict[str, float]]] = {}
    t0 = time.time()
    for c in a.configs:
        results[c] = {}
        for sd in a.seeds:
            results[c][sd] = measure(c, sd)
            print(f"{Path(c).stem} seed {sd}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[c][sd].items()), flush=True)
    (out / "results.json").write_text(json.dumps({Path(c).stem: v for c, v in results.items()}, indent=2))
    md = table(results)
    (out / "table.md").write_text(md + "\n")
    plot(results, out / "kl_vs_epsilon.png")
    print(md)
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
