"""HetLoRA baseline (design.md §2; Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024): each device trains LoRA in every layer at its own rank r_k, chosen
from its capacity; the server keeps the maximum rank, sends each device the first r_k slots, and
aggregates by zero-padding to the maximum rank and averaging with weights ‖B_k A_k‖_F.

Our reading, where the paper leaves details open:

* **Ranks from capacity.** c_k is the device's speed: 1 / (predicted time of one full-rank round,
  compute + WAN transfer, from its base profile) with `capacity = "round_time"`, or its FLOP/s with
  `capacity = "flops"`. Ranks are log-linear in c_k between the slowest (r_min) and fastest (r_max)
  device: r_k = r_min + round((r_max − r_min)·log(c_k/c_min)/log(c_max/c_min)). On `jetson80`
  capacities span well over 10×, so plain proportionality would put nearly every device at r_min.
* **Sparsity-weighted aggregation.** The weight of device k for module (l, m) is ‖ΔW_{k,l,m}‖_F in
  the server convention, which equals the device's own (α/r_k)-scaled update (`lora_state`); the head
  is weighted by data size n_k. `weighting = "data"` uses n_k everywhere and `"norm_data"` n_k·‖ΔW‖.
  Zero-padding (`aggregate.zero_pad_average`) divides every slot by the weight of all senders.
* **Self-pruning** (off unless `prune_strength` > 0). A device of rank r > r_min adds
  λ·Σ_{l,m} (α/r)·‖B[:, c:r] A[c:r]‖_F to its loss, c = max(1, min(r−1, ⌊γ·r⌋)): the ΔW of its tail
  slots, pushed toward zero. The server measures that tail norm on the returned update; when it is
  smaller than the device's previous measurement (with `prune_ranks`), the device's rank drops to
  max(r_min, c) from the next round on. λ and γ reach the device through `DevicePlan.options`, and the
  loss term is declared in this module's `TRAINER_OPTIONS` under `hetlora_prune` (see `registry`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from hierfedlora.aggregate import delta_norms, lora_modules, zero_pad_average
from hierfedlora.errors import ConfigError
from hierfedlora.lora_state import State, lora_key, parse_key
from hierfedlora.protocol import DevicePlan, RoundContext, SetupInfo, TrainResult
from hierfedlora.strategies.base import OneShotStrategy

NAME = "hetlora"
PRUNE_KEY = "hetlora_prune"  # DevicePlan.options: λ (the regulariser's strength)
GAMMA_KEY = "hetlora_prune_gamma"  # DevicePlan.options: γ (fraction of the rank kept)


class RankSettings(BaseModel):
    """Per-device ranks from capacity; shared with FlexLoRA, which assigns ranks the same way."""

    model_config = ConfigDict(extra="forbid")

    rank_min: int = Field(2, ge=1, description="Rank of the slowest device (clamped to rank_max).")
    rank_max: int | None = Field(None, ge=1, description="Rank of the fastest device and of the server; None = model.rank.")
    capacity: Literal["round_time", "flops"] = Field(
        "round_time", description="Device capacity behind its rank: 1/predicted full-rank round time, or FLOP/s.")


class Settings(RankSettings):
    weighting: Literal["norm", "data", "norm_data"] = Field(
        "norm", description="LoRA aggregation weight: ‖B_k A_k‖_F (HetLoRA), data size n_k, or their product.")
    prune_strength: float = Field(0.0, ge=0, description="λ of the self-pruning regulariser (0 = off).")
    prune_gamma: float = Field(0.9, gt=0, lt=1, description="γ: the regulariser targets slots ⌊γ·r⌋..r-1.")
    prune_ranks: bool = Field(True, description="With the regulariser on, drop a device's rank to ⌊γ·r⌋ when its tail norm shrank.")


# -- ranks from capacity --------------------------------------------------------------------------

def capacity_ranks(capacity: Sequence[float], rank_min: int, rank_max: int) -> list[int]:
    """r_k = r_min + round((r_max − r_min)·log(c_k/c_min)/log(c_max/c_min)); all r_max if equal."""
    lo, hi = min(capacity), max(capacity)
    if hi <= lo * (1 + 1e-12):
        return [rank_max] * len(capacity)
    span = math.log(hi / lo)
    return [rank_min + round((rank_max - rank_min) * math.log(c / lo) / span) for c in capacity]


def device_capacity(setup: SetupInfo, how: str, rank: int) -> list[float]:
    """c_k = FLOP/s, or 1 / (compute + transfer of a round training every layer at `rank`)."""
    if how == "flops":
        return [p.flops for p in setup.profiles]
    L = setup.layout.num_layers
    nbytes = setup.payload_bytes({l: rank for l in range(L)})
    return [1.0 / (setup.predict_compute_s(k, L) + setup.predict_transfer_s(k, nbytes, nbytes))
            for k in range(setup.num_devices)]


def resolve_rank_bounds(rank_min: int, rank_max: int | None, model_rank: int, method: str) -> tuple[int, int]:
    """(r_min, r_max) with r_max defaulting to, and bounded by, the model's LoRA rank."""
    hi = model_rank if rank_max is None else rank_max
    if hi > model_rank:
        raise ConfigError(f"method.rank_max = {hi} exceeds model.rank = {model_rank}; {method} keeps at most "
                         "model.rank slots per layer (raise model.rank or lower method.rank_max).")
    return min(rank_min, hi), hi


# -- self-pruning ---------------------------------------------------------------------------------

def tail_start(rank: int, gamma: float) -> int:
    """c = max(1, min(r−1, ⌊γ·r⌋)): the first pruned slot (at least one slot kept, one in the tail)."""
    return max(1, min(rank - 1, math.floor(gamma * rank)))


def _product_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # ‖B A‖_F = sqrt(tr((BᵀB)(AAᵀ))); clamped so the gradient is 0, not NaN, at B A = 0
    return ((b.T @ b) * (a @ a.T)).sum().clamp_min(1e-12).sqrt()


def prune_penalty(model, plan: DevicePlan, value: object) -> torch.Tensor:
    """λ·Σ_{l,m} (α/r)·‖B[:, c:r] A[c:r]‖_F over the trained layers (device convention)."""
    gamma = float(plan.options.get(GAMMA_KEY, 0.9))
    total = torch.zeros((), device=model.device)
    for (layer, _), mod in sorted(model.lora.items()):
        r = plan.ranks.get(layer, 0)
        if layer not in plan.train_layers or r < 2:
            continue
        c = tail_start(r, gamma)
        a, b = mod.lora_A["default"].weight[c:r], mod.lora_B["default"].weight[:, c:r]
        total = total + mod.scaling["default"] * _product_norm(b, a)
    return float(value) * total


TRAINER_OPTIONS = {PRUNE_KEY: prune_penalty}  # declared to the trainer through `registry.trainer_options`


def tail_norm(update: State, rank: int, gamma: float, alpha: float, global_ranks: dict[int, int]) -> float:
    """Σ_{l,m} ‖(α/R_l)·B[:, c:r] A[c:r]‖_F of a server-convention update (what the regulariser shrinks)."""
    c = tail_start(rank, gamma)
    tails = {}
    for l, m in lora_modules(update):
        tails[lora_key(l, m, "A")] = update[lora_key(l, m, "A")][c:rank]
        tails[lora_key(l, m, "B")] = update[lora_key(l, m, "B")][:, c:rank]
    return float(sum(delta_norms(tails, alpha, global_ranks).values()))


# -- aggregation weights --------------------------------------------------------------------------

def aggregation_weights(update: State, num_examples: int, alpha: float, global_ranks: dict[int, int],
                        weighting: str) -> dict[str, float]:
    """Per-key weight of one update: w_{k,l,m} = ‖ΔW_{k,l,m}‖_F (and/or n_k); the head gets n_k."""
    norms = delta_norms(update, alpha, global_ranks) if weighting != "data" else {}
    out = {}
    for key in update:
        p = parse_key(key)
        if p is None or weighting == "data":
            out[key] = float(num_examples)
        else:
            out[key] = norms[(p[0], p[1])] * (num_examples if weighting == "norm_data" else 1.0)
    return out


class Strategy(OneShotStrategy):
    secure_aggregation_refusal = (
        "its aggregation weights are per-device update norms (‖B_k A_k‖_F per module), and its self-pruning "
        "reads each device's tail norm: both need each update on its own")
    no_central_dp = ("its aggregation weights each update by the norm of its factors (not a uniform mean), and "
                     "devices of different ranks hold different slots")

    def __init__(self, settings: Settings, setup: SetupInfo):
        self.s = settings
        self.setup = setup
        self.L = setup.layout.num_layers
        self.rank_min, self.rank_max = resolve_rank_bounds(settings.rank_min, settings.rank_max, setup.rank, NAME)
        cap = device_capacity(setup, settings.capacity, self.rank_max)
        self.ranks = capacity_ranks(cap, self.rank_min, self.rank_max)
        self.tail_prev: list[float | None] = [None] * setup.num_devices

    def global_ranks(self) -> dict[int, int]:
        return {l: self.rank_max for l in range(self.L)}

    def plan(self, rnd: int, ctx: RoundContext) -> tuple[list[DevicePlan], dict[str, Any]]:
        config = [{"device": d, "depth": self.L, "ranks": [self.ranks[d]] * self.L} for d in ctx.available]
        return [self.device_plan(d) for d in ctx.available], {"device_config": config}

    def device_plan(self, device: int) -> DevicePlan:
        r = self.ranks[device]
        options = {}
        if self.s.prune_strength > 0 and r > self.rank_min:
            options = {PRUNE_KEY: self.s.prune_strength, GAMMA_KEY: self.s.prune_gamma}
        return DevicePlan(device, {l: r for l in range(self.L)}, tuple(range(self.L)), self.setup.local_steps, options=options)

    def aggregate(self, state: State, results: list[TrainResult], plans: dict[int, DevicePlan]) -> tuple[State, dict[str, Any]]:
        G = self.global_ranks()
        masks = [plans[r.device].ranks for r in results]
        weights = [aggregation_weights(r.update, r.num_examples, self.setup.alpha, G, self.s.weighting) for r in results]
        # x_l = Σ_k w_{k,l}·pad(u_{k,l}) / Σ_k w_{k,l}
        new = zero_pad_average(state, [r.update for r in results], masks, weights)
        pruned = self._self_prune(results, plans)
        return new, ({"pruned": pruned} if self.s.prune_strength > 0 else {})

    def _self_prune(self, results, plans: dict[int, DevicePlan]) -> list[int]:
        """Shrink r_k to max(r_min, c) for devices whose regularised tail norm decreased."""
        pruned = []
        for res in results:
            d = res.device
            if PRUNE_KEY not in plans[d].options:
                continue
            r = self.ranks[d]
            tail = tail_norm(res.update, r, self.s.prune_gamma, self.setup.alpha, self.global_ranks())
            prev = self.tail_prev[d]
            if self.s.prune_ranks and prev is not None and tail < prev:
                self.ranks[d] = max(self.rank_min, tail_start(r, self.s.prune_gamma))
                self.tail_prev[d] = None  # a new tail from the next round on
                pruned.append(d)
            else:
                self.tail_prev[d] = tail
        return pruned

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": list(self.ranks), "tail_prev": list(self.tail_prev)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.ranks = [int(r) for r in d["ranks"]]
        self.tail_prev = list(d["tail_prev"])
