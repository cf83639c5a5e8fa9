"""Near-IID device grouping for HierFedLoRA (design.md §2, HierFedLoRA step 1).

Why: FedAvg inside a group whose pooled labels look like the global distribution behaves like
IID training, so the groups' models agree and the PS's layer-wise average loses little to label
skew. And because a group's round ends with its slowest member, putting devices of similar speed
together wastes less waiting time. The objective weighs the two:

    J = Σ_k [ KL(P_k ‖ P) + λ·S_k ]

- P is the label distribution of all devices' data pooled, P_k that of group k's data pooled.
- S_k = Var_{i∈k}(log t_i) / Var_{all i}(log t_i) is the resource spread of group k, where t_i is
  device i's predicted time for one round (the caller decides what that is; the strategy uses one
  full-depth intra-group round: E local steps plus model down/up on the group link). Log times make
  the spread scale-free (a 2x gap costs the same for fast and slow devices) and dividing by the
  fleet's variance makes S_k ≈ 1 for a random group, so λ is unitless: λ = 0.05 says "halving a
  group's speed spread is worth 0.025 nats of label divergence". Variance (not max/min) is used
  because it changes smoothly when one device moves, which the local search needs.

Group sizes are balanced (the "balance" setting `size_slack` = s): every group holds between
floor(n/K·(1-s)) (at least 1) and ceil(n/K·(1+s)) devices; s = 0 gives equal sizes (±1).

The procedure (our reading of design.md §2.1's "greedy K-means-style" procedure):

1. Seeding + greedy assignment: devices in order of decreasing data size (ties broken by a seeded
   shuffle); the first K seed one group each, every later one joins the group whose J grows least
   among the groups with room (as K-means assigns a point to its nearest centre, "nearest" here
   being the objective's increase).
2. Refinement, K-means' reassignment step: sweep the devices in a seeded order; for each, apply the
   single best J-lowering change among moving it to another group (sizes permitting) and swapping it
   with a device of another group (sizes unchanged). Stop after a sweep that changes nothing, or
   after `max_passes` sweeps. J never increases, so the procedure terminates.

What a group is scored on is pluggable (`PooledStatistic`): the KL term needs only each device's
additive row (its label counts; pooling data = summing rows) and a divergence of a pooled row from
the fleet's. `group_devices` is the label case; `group_by` runs the same greedy on any statistic,
e.g. label-free sketches (`private_grouping`), so the procedure exists once.

All functions are pure; randomness comes only from the `seed` argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hierfedlora.errors import ConfigError

_TOL = 1e-12  # a change must lower J by more than this (guards against float ping-pong)


def label_dist(counts: np.ndarray) -> np.ndarray:
    """Rows of counts -> rows of probabilities (an all-zero row stays zero)."""
    counts = np.asarray(counts, dtype=np.float64)
    tot = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)


def kl_rows(counts: np.ndarray, p: np.ndarray) -> np.ndarray:
    """KL(q ‖ p) = Σ_c q_c·log(q_c / p_c) for each row q of normalised `counts` (0·log 0 = 0)."""
    q = label_dist(counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * np.log(q / p), 0.0)
    return terms.sum(axis=-1)


def size_bounds(n: int, k: int, slack: float) -> tuple[int, int]:
    """(min, max) group size: floor(n/K·(1-s)) ≥ 1 and ceil(n/K·(1+s))."""
    lo = max(1, int(np.floor(n / k * (1 - slack) + 1e-9)))
    hi = max(lo, int(np.ceil(n / k * (1 + slack) - 1e-9)))
    return lo, hi


@dataclass(frozen=True)
class PooledStatistic:
    """What the grouping scores a group on: one additive row per device (the rows of a group sum
    to the group's pooled statistic) and `divergence`, pooled rows [..., d] -> the first term of
    J per row (0 for a group that looks like the whole fleet). `sizes` (examples per device) only
    orders the greedy seeding."""

    rows: np.ndarray
    sizes: np.ndarray
    divergence: Callable[[np.ndarray], np.ndarray]


def label_statistic(hists: np.ndarray) -> PooledStatistic:
    """Label counts, scored by KL(P_k ‖ P) with P the distribution of all rows pooled."""
    hists = np.asarray(hists, dtype=np.float64)
    p = label_dist(hists.sum(axis=0))
    return PooledStatistic(hists, hists.sum(axis=1), lambda counts: kl_rows(counts, p))


class _Groups:
    """Running per-group sums so a move or swap is scored without recomputing every group."""

    def __init__(self, stat: PooledStatistic, x: np.ndarray, k: int, lam: float):
        self.h, self.x, self.k, self.lam = stat.rows, x, k, lam
        self.divergence = stat.divergence
        var = float(x.var()) if len(x) else 0.0
        self.norm = lam / var if var > 0 else 0.0  # λ / Var_all(log t); 0 when all devices are alike
        self.counts = np.zeros((k, self.h.shape[1]))
        self.s1 = np.zeros(k)
        self.s2 = np.zeros(k)
        self.m = np.zeros(k, dtype=np.int64)
        self.of = np.full(len(x), -1, dtype=np.int64)

    def cost(self, counts: np.ndarray, s1: np.ndarray, s2: np.ndarray, m: np.ndarray) -> np.ndarray:
        """D(pooled_k) + λ·Var_k(log t)/Var_all(log t), vectorised over leading dims (empty group: 0);
        D = KL(P_k ‖ P) for labels."""
        mm = np.maximum(m, 1)
        var = np.maximum(s2 / mm - (s1 / mm) ** 2, 0.0)
        return np.where(m > 0, self.divergence(counts) + self.norm * var, 0.0)

    def group_cost(self, g: int) -> float:
        return float(self.cost(self.counts[g], self.s1[g], self.s2[g], self.m[g]))

    def add(self, i: int, g: int, sign: int = 1) -> None:
        self.counts[g] += sign * self.h[i]
        self.s1[g] += sign * self.x[i]
        self.s2[g] += sign * self.x[i] ** 2
        self.m[g] += sign
        self.of[i] = g if sign > 0 else -1

    def total(self) -> float:
        return float(self.cost(self.counts, self.s1, self.s2, self.m).sum())


def _greedy_init(st: _Groups, order: np.ndarray, lo: int, hi: int) -> None:
    n = len(order)
    for pos, i in enumerate(order):
        if pos < st.k:  # seeding: the K largest devices open one group each
            st.add(int(i), pos)
            continue
        room = st.m < hi
        deficit = int(np.maximum(lo - st.m, 0).sum())
        if n - pos <= deficit:  # the devices left are needed to bring small groups up to `lo`
            room &= st.m < lo
        old = st.cost(st.counts, st.s1, st.s2, st.m)
        new = st.cost(st.counts + st.h[i], st.s1 + st.x[i], st.s2 + st.x[i] ** 2, st.m + 1)
        delta = np.where(room, new - old, np.inf)
        st.add(int(i), int(np.argmin(delta)))


def _best_change(st: _Groups, i: int, lo: int, hi: int) -> tuple[float, str, int]:
    """(ΔJ, 'move'|'swap', target group or partner device) of device i's best single change."""
    a = int(st.of[i])
    h, x = st.h, st.x
    cost_a = st.group_cost(a)
    best = (0.0, "", -1)
    # moves: ΔJ_b = cost(a − i) + cost(b + i) − cost(a) − cost(b)
    if st.m[a] > lo:
        old = st.cost(st.counts, st.s1, st.s2, st.m)
        left_a = float(st.cost(st.counts[a] - h[i], st.s1[a] - x[i], st.s2[a] - x[i] ** 2, st.m[a] - 1))
        new_b = st.cost(st.counts + h[i], st.s1 + x[i], st.s2 + x[i] ** 2, st.m + 1)
        delta = left_a - cost_a + new_b - old
        delta[a] = np.inf
        delta[st.m >= hi] = np.inf
        b = int(np.argmin(delta))
        if delta[b] < best[0] - _TOL:
            best = (float(delta[b]), "move", b)
    # swaps with every device j outside a: ΔJ_j = cost(a − i + j) + cost(g_j − j + i) − cost(a) − cost(g_j)
    others = np.flatnonzero(st.of != a)
    if len(others):
        g = st.of[others]
        hj, xj = h[others], x[others]
        new_a = st.cost(st.counts[a] - h[i] + hj, st.s1[a] - x[i] + xj, st.s2[a] - x[i] ** 2 + xj ** 2,
                        np.full(len(others), st.m[a]))
        new_b = st.cost(st.counts[g] - hj + h[i], st.s1[g] - xj + x[i], st.s2[g] - xj ** 2 + x[i] ** 2, st.m[g])
        old_b = st.cost(st.counts[g], st.s1[g], st.s2[g], st.m[g])
        delta = new_a + new_b - cost_a - old_b
        j = int(np.argmin(delta))
        if delta[j] < best[0] - _TOL:
            best = (float(delta[j]), "swap", int(others[j]))
    return best


def group_devices(hists: np.ndarray, times: np.ndarray | list[float], num_groups: int, lam: float = 0.0,
                  size_slack: float = 0.0, seed: int = 0, max_passes: int = 20) -> list[list[int]]:
    """Partition devices into `num_groups` groups minimising J (module docstring); sorted members.

    `hists` is [num_devices, num_classes] label counts, `times` each device's predicted round time.
    """
    return group_by(label_statistic(hists), times, num_groups, lam, size_slack, seed, max_passes)


def group_by(stat: PooledStatistic, times: np.ndarray | list[float], num_groups: int, lam: float = 0.0,
             size_slack: float = 0.0, seed: int = 0, max_passes: int = 20) -> list[list[int]]:
    """`group_devices` on any pooled statistic: J = Σ_k [D(pooled_k) + λ·S_k]."""
    t = np.asarray(times, dtype=np.float64)
    n = len(stat.rows)
    if not 1 <= num_groups <= n:
        raise ConfigError(f"num_groups = {num_groups} must be between 1 and the number of devices ({n})")
    if len(t) != n or np.any(t <= 0):
        raise ValueError("times must hold one positive predicted round time per device")
    lo, hi = size_bounds(n, num_groups, size_slack)
    rng = np.random.default_rng([seed, 7007])
    st = _Groups(stat, np.log(t), num_groups, lam)
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(-np.asarray(stat.sizes, dtype=np.float64)[shuffled], kind="stable")]
    _greedy_init(st, order, lo, hi)
    for _ in range(max_passes):
        changed = False
        for i in rng.permutation(n):
            delta, kind, target = _best_change(st, int(i), lo, hi)
            if not kind:
                continue
            a = int(st.of[i])
            st.add(int(i), a, -1)
            if kind == "move":
                st.add(int(i), target)
            else:
                b = int(st.of[target])
                st.add(target, b, -1)
                st.add(int(i), b)
                st.add(target, a)
            changed = True
        if not changed:
            break
    return [sorted(np.flatnonzero(st.of == g).tolist()) for g in range(num_groups)]


def random_groups(n: int, num_groups: int, seed: int = 0) -> list[list[int]]:
    """Seeded random groups of (near-)equal size: the baseline grouping is compared against."""
    perm = np.random.default_rng([seed, 7008]).permutation(n)
    return [sorted(int(i) for i in perm[g::num_groups]) for g in range(num_groups)]


def pooled_kl(hists: np.ndarray, members: list[int]) -> float:
    """KL(P_k ‖ P) of one group's pooled labels against all devices' pooled labels."""
    hists = np.asarray(hists, dtype=np.float64)
    p = label_dist(hists.sum(axis=0))
    return float(kl_rows(hists[members].sum(axis=0), p))


def resource_spread(times: np.ndarray | list[float], members: list[int]) -> float:
    """S_k = Var_{i∈k}(log t_i) / Var_all(log t_i) (0 when every device is alike)."""
    x = np.log(np.asarray(times, dtype=np.float64))
    var = float(x.var())
    return float(x[members].var() / var) if var > 0 else 0.0


def objective(hists: np.ndarray, times: np.ndarray | list[float], groups: list[list[int]], lam: float) -> float:
    """J = Σ_k KL(P_k ‖ P) + λ·S_k."""
    return float(sum(pooled_kl(hists, g) + lam * resource_spread(times, g) for g in groups))


def grouping_report(hists: np.ndarray, times: np.ndarray | list[float], groups: list[list[int]],
                    lam: float, seed: int = 0) -> dict[str, Any]:
    """Per group: members, data, pooled KL to the global distribution, slowest/fastest member's
    predicted round time; plus the mean KL of seeded random groups of the same sizes for scale."""
    hists = np.asarray(hists, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    rows = []
    for k, g in enumerate(groups):
        slow, fast = (max(g, key=lambda i: t[i]), min(g, key=lambda i: t[i])) if g else (None, None)
        rows.append({
            "group": k, "members": [int(i) for i in g], "num_examples": int(hists[g].sum()) if g else 0,
            "kl_to_global": pooled_kl(hists, g) if g else None,
            "resource_spread": resource_spread(t, g) if g else None,
            "slowest_device": slow, "slowest_round_s": float(t[slow]) if g else None,
            "fastest_device": fast, "fastest_round_s": float(t[fast]) if g else None,
        })
    rand = random_groups(len(hists), len(groups), seed)
    return {
        "num_groups": len(groups), "lambda": lam, "objective": objective(hists, t, groups, lam),
        "mean_kl": float(np.mean([r["kl_to_global"] for r in rows if r["kl_to_global"] is not None])),
        "random_mean_kl": float(np.mean([pooled_kl(hists, g) for g in rand])),
        "groups": rows,
    }
