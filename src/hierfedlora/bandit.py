"""R-UCB: the resource-aware upper-confidence-bound bandit of HierFedLoRA (design.md §2, step 2).

Each group owns one bandit. An arm is any configuration (HierFedLoRA's are (depth d, frequency τ)
pairs; this module only sees arm indices). Each global round the caller says which arms are
eligible (their predicted time and traffic fit the group's budget) and the bandit picks

    a* = argmax_{a eligible} UCB_a,   UCB_a = μ_a / s + c·sqrt(2·ln t / n_a)

with μ_a the mean reward of arm a, n_a its plays, t the plays of all arms, c the exploration
constant, and s the largest |reward| seen so far. Why divide by s: a reward is a validation gain
per simulated second, whose scale depends on the model, data and fleet (1e-4 per second or 10);
scaled to [-1, 1] the exploration constant c means the same thing in every run. Eligible arms never
played go first (their index is +∞), in a random order from the caller's generator when it passes
one (otherwise in arm order); ties between finite indices go to the lowest arm index. Ineligible
arms are never returned: when no arm is eligible `select` raises and the caller decides.

The state is plain Python numbers (JSON-able), so a checkpointed run resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def ucb_index(mean: float, plays: int, total: int, c: float, scale: float = 1.0) -> float:
    """UCB_a = μ_a / s + c·sqrt(2·ln t / n_a); +∞ for an arm never played."""
    if plays <= 0:
        return math.inf
    return mean / scale + c * math.sqrt(2.0 * math.log(max(total, 1)) / plays)


class RUCB:
    """One group's bandit over `num_arms` arms (see the module docstring for the rule)."""

    def __init__(self, num_arms: int, c: float):
        if num_arms < 1:
            raise ValueError("a bandit needs at least one arm")
        self.c = float(c)
        self.counts = [0] * num_arms
        self.means = [0.0] * num_arms
        self.t = 0
        self.scale = 0.0

    @property
    def num_arms(self) -> int:
        return len(self.counts)

    def indices(self) -> list[float]:
        s = self.scale if self.scale > 0 else 1.0
        return [ucb_index(m, n, self.t, self.c, s) for m, n in zip(self.means, self.counts)]

    def select(self, eligible: Sequence[bool], rng: np.random.Generator | None = None) -> int:
        """The eligible arm with the highest index (unplayed ones first)."""
        if len(eligible) != self.num_arms:
            raise ValueError(f"eligibility given for {len(eligible)} arms, the bandit has {self.num_arms}")
        cand = [a for a, ok in enumerate(eligible) if ok]
        if not cand:
            raise ValueError("no eligible arm")
        fresh = [a for a in cand if self.counts[a] == 0]
        if fresh:
            return int(fresh[int(rng.integers(len(fresh)))]) if rng is not None else fresh[0]
        idx = self.indices()
        return max(cand, key=lambda a: (idx[a], -a))

    def update(self, arm: int, reward: float) -> None:
        """μ_a ← μ_a + (r − μ_a)/n_a;  s ← max(s, |r|)."""
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}")
        self.counts[arm] += 1
        self.means[arm] += (reward - self.means[arm]) / self.counts[arm]
        self.t += 1
        self.scale = max(self.scale, abs(reward))

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c, "counts": list(self.counts), "means": list(self.means), "t": self.t, "scale": self.scale}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if len(d["counts"]) != self.num_arms:
            raise ValueError(f"bandit state has {len(d['counts'])} arms, this bandit {self.num_arms}")
        self.c = float(d["c"])
        self.counts = [int(n) for n in d["counts"]]
        self.means = [float(m) for m in d["means"]]
        self.t = int(d["t"])
        self.scale = float(d["scale"])
