"""LEGEND (design.md §2; seed paper 001, "Adaptive Parameter-Efficient Federated Fine-Tuning on
Heterogeneous Devices"): each device i runs LoRA only in its top D_i layers (its *LoRA depth*; the
layers below run without LoRA on that device), all of them trained, with a *rank distribution* R_l
that rises toward the output. A configuration step picks every D_i from the device's predicted
round time so that devices finish a round at about the same simulated time, within a budget.

Our reading, where the paper's abstract leaves details open:

* **Rank distribution** (server, fixed for the run). A linear ramp from `rank_min` at layer 0 to
  `rank_max` (default model.rank) at the top, R_l = ⌊r_min + (r_max − r_min)·l/(L−1) + ½⌋. With
  `rank_budget` B, the whole ramp is scaled by the largest c ≤ 1 with Σ_l ⌊c·R_l⌋ ≤ B, which keeps
  it rising; lowest layers may reach 0 (no LoRA there for anyone), in line with the paper's finding
  that LoRA near the output matters most. A device uses R_l in each of its layers (only devices on
  the scaled rungs below use less), so one distribution serves all devices.
* **Configuration ladder**, richest first: depth D_max .. D_min at the full ranks, then (with
  `rank_scaling`) depth D_min with ranks scaled down, max(1, ⌊R_l·k/R_top⌋) for k = R_top−1 .. 1. Depth
  is LEGEND's knob; the scaled rungs only exist for devices whose link is too slow for even D_min.
* **Predicted round time** of device i on a rung c: compute of E local steps with backward through D
  layers (`SetupInfo.predict_compute_s`) + download and upload of the rung's LoRA slots and the head
  (`payload_bytes`, `predict_transfer_s`) on this round's profile (`ctx.profiles`: current bandwidth).
* **Target.** T* = max(quantile_q{T_i(richest)}, max_i T_i(leanest)): the `target_quantile` device's
  full-configuration time, but never below the fastest round any configuration achieves (the
  slowest device at its leanest rung). Each device takes its richest rung with T_i ≤ T*, so the round
  lasts T* and devices faster than T* at the full configuration keep it. q = 1 gives every device
  the full configuration; q = 0 the shortest feasible round.
* **Traffic budget** (`traffic_budget_mb`, up + down over all devices per round, everyone taking
  part). While it is exceeded, the device with the largest payload (ties: most time to spare, then
  lowest id) steps one rung down. If every device is at its leanest rung the budget cannot be met;
  the round's metrics say so (`budget_met`).
* Recomputed every `reconfigure_every` rounds from that round's profiles; the chosen configuration
  is part of the strategy state, so a resumed run continues with it.
* **Aggregation** (`aggregate.masked_slot_average`): per layer and per rank slot, the data-weighted
  mean over the devices holding the slot; other slots keep their value. Updates are in the server's
  convention, in which a device's rank-r slots, scaled by α/R_l, give the same ΔW as on the device at
  α/r (`lora_state`): averaging factors of different ranks is averaging like with like.

Each round's metrics carry `device_config` ([{device, depth, ranks (per layer, 0 = no LoRA),
predicted_s}]), `target_round_s` and, with a traffic budget, `budget_met`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hierfedlora.aggregate import masked_slot_average
from hierfedlora.errors import ConfigError
from hierfedlora.fleet import DeviceProfile
from hierfedlora.lora_state import State
from hierfedlora.protocol import DevicePlan, RoundContext, SetupInfo, TrainResult
from hierfedlora.strategies.base import OneShotStrategy

NAME = "legend"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank_min: int = Field(2, ge=1, description="Rank of the lowest layer in the rising distribution (clamped to rank_max).")
    rank_max: int | None = Field(None, ge=1, description="Rank of the top layer; None = model.rank.")
    rank_budget: int | None = Field(None, ge=1, description="Cap on the distribution's total rank Σ_l R_l; None = no cap.")
    depth_min: int = Field(1, ge=1, description="Fewest top layers a device trains.")
    depth_max: int | None = Field(None, ge=1, description="Most top layers a device trains; None = all layers with LoRA.")
    target_quantile: float = Field(
        0.5, ge=0, le=1, description="Round-time target: this quantile of full-configuration times (1 = all full).")
    rank_scaling: bool = Field(True, description="Let devices too slow for depth_min also scale their ranks down.")
    traffic_budget_mb: float | None = Field(
        None, gt=0, description="Cap on a round's traffic (MB up + down, all devices); None = no cap.")
    reconfigure_every: int = Field(
        1, ge=1, description="Re-run the configuration every this many rounds (with the current bandwidth).")

    @model_validator(mode="after")
    def _depths_ordered(self) -> "Settings":
        if self.depth_max is not None and self.depth_min > self.depth_max:
            raise ConfigError(f"method.depth_min = {self.depth_min} exceeds method.depth_max = {self.depth_max}; "
                             "lower depth_min or raise depth_max")
        return self


# -- rank distribution ----------------------------------------------------------------------------

def rank_ramp(num_layers: int, rank_min: int, rank_max: int) -> list[int]:
    """R_l = ⌊r_min + (r_max − r_min)·l/(L−1) + ½⌋: rising linearly toward the output."""
    if num_layers == 1:
        return [rank_max]
    return [math.floor(rank_min + (rank_max - rank_min) * l / (num_layers - 1) + 0.5) for l in range(num_layers)]


def fit_rank_budget(ranks: list[int], budget: int | None) -> list[int]:
    """⌊c·R_l⌋ for the largest c ≤ 1 with Σ_l ⌊c·R_l⌋ ≤ budget (exact, over the breakpoints k/R_j)."""
    if budget is None or sum(ranks) <= budget:
        return list(ranks)
    cuts = sorted({Fraction(k, r) for r in ranks if r > 0 for k in range(1, r + 1)}, reverse=True)
    for c in cuts:
        scaled = [math.floor(c * r) for r in ranks]
        if sum(scaled) <= budget:
            return scaled
    return [0] * len(ranks)


def rank_distribution(num_layers: int, rank_min: int, rank_max: int, budget: int | None) -> dict[int, int]:
    return dict(enumerate(fit_rank_budget(rank_ramp(num_layers, rank_min, rank_max), budget)))


# -- configuration --------------------------------------------------------------------------------

def config_ladder(global_ranks: dict[int, int], depth_min: int, depth_max: int, rank_scaling: bool) -> list[dict[int, int]]:
    """Device configurations (layer -> rank), richest first: fewer top layers, then lower ranks."""
    layers = sorted(l for l, r in global_ranks.items() if r > 0)
    rungs = [{l: global_ranks[l] for l in layers[len(layers) - d:]} for d in range(depth_max, depth_min - 1, -1)]
    if rank_scaling:
        top = global_ranks[layers[-1]]
        for k in range(top - 1, 0, -1):
            rung = {l: max(1, global_ranks[l] * k // top) for l in rungs[-1]}
            if rung != rungs[-1]:
                rungs.append(rung)
    return rungs


def predicted_time(setup: SetupInfo, device: int, ranks: dict[int, int], profile: DeviceProfile) -> float:
    """T = compute(E steps, backward through len(ranks) layers) + download + upload of the payload."""
    nbytes = setup.payload_bytes(ranks)
    return (setup.predict_compute_s(device, len(ranks), profile=profile)
            + setup.predict_transfer_s(device, nbytes, nbytes, "wan", profile=profile))


def choose_rungs(times: np.ndarray, traffic: np.ndarray, quantile: float,
                 budget: float | None, eligible: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
    """(rung per device, target T*, budget met) from times[i, c] (rungs richest first) and traffic[c].

    T* = max(quantile_q_i T[i, 0], max_i T[i, -1]);  c_i = min{c : T[i, c] ≤ T*, c eligible for i}; then, while
    Σ_i traffic[c_i] > budget, the device with the largest traffic[c_i] (ties: least T[i, c_i], then
    lowest i) steps down one rung.
    """
    n, C = times.shape
    target = max(float(np.quantile(times[:, 0], quantile)), float(times[:, -1].max()))
    fits = times <= target * (1 + 1e-9)
    if eligible is not None:  # rungs a device cannot hold (memory) do not fit it, whatever their time
        fits &= eligible
    idx = fits.argmax(axis=1)  # first (richest) rung that fits; the last one always does
    if budget is not None:
        while traffic[idx].sum() > budget:
            movable = [i for i in range(n) if idx[i] < C - 1]
            if not movable:
                return idx, target, False
            i = min(movable, key=lambda i: (-traffic[idx[i]], times[i, idx[i]], i))
            idx[i] += 1
    return idx, target, True


@dataclass
class Configuration:
    """The outcome of one configuration step: every device's layer -> rank, and the target."""

    ranks: list[dict[int, int]]
    predicted_s: list[float]
    target_s: float
    budget_met: bool


def configure(setup: SetupInfo, settings: Settings, global_ranks: dict[int, int],
              profiles: list[DeviceProfile]) -> Configuration:
    """Choose each device's depth (and ranks) for these profiles (see the module docstring)."""
    n_lora = sum(1 for r in global_ranks.values() if r > 0)
    d_max = min(settings.depth_max or n_lora, n_lora)
    d_min = min(settings.depth_min, d_max)
    ladder = config_ladder(global_ranks, d_min, d_max, settings.rank_scaling)
    times = np.array([[predicted_time(setup, i, rung, profiles[i]) for rung in ladder] for i in range(len(profiles))])
    # a rung over a device's memory is not eligible for it (the poorest rung stays: if even that does
    # not fit, the engine refuses the plan by name)
    eligible = np.array([[c == len(ladder) - 1 or setup.fits_memory(i, rung, len(rung), profiles[i])
                          for c, rung in enumerate(ladder)] for i in range(len(profiles))])
    traffic = np.array([2.0 * setup.payload_bytes(rung) for rung in ladder])
    budget = None if settings.traffic_budget_mb is None else settings.traffic_budget_mb * 1e6
    idx, target, met = choose_rungs(times, traffic, settings.target_quantile, budget, eligible)
    return Configuration([dict(ladder[c]) for c in idx], [float(times[i, c]) for i, c in enumerate(idx)], target, met)


def config_metrics(cfg: Configuration, devices: list[int], num_layers: int, budget: bool) -> dict[str, Any]:
    """The round's `RoundReport.extra`: each device's (D_i, per-layer ranks, predicted time) and T*."""
    out: dict[str, Any] = {
        "device_config": [{"device": d, "depth": len(cfg.ranks[d]),
                           "ranks": [cfg.ranks[d].get(l, 0) for l in range(num_layers)],  # 0 = no LoRA
                           "predicted_s": cfg.predicted_s[d]} for d in devices],
        "target_round_s": cfg.target_s,
    }
    if budget:
        out["budget_met"] = cfg.budget_met
    return out


class Strategy(OneShotStrategy):
    secure_aggregation_refusal = (
        "its per-slot averages divide each rank slot by the weight of the devices that hold it, and its devices "
        "hold different layers and ranks: a secure sum would need every update zero-padded to the server's ranks "
        "with a per-slot weight beside it, which hierfedlora does not do")
    no_central_dp = ("devices of different depths and ranks hold different slots, so a slot's mean runs over its h "
                     "holders only (sensitivity C/h, not C/m)")

    def __init__(self, settings: Settings, setup: SetupInfo):
        self.s = settings
        self.setup = setup
        self.L = setup.layout.num_layers
        r_max = setup.rank if settings.rank_max is None else settings.rank_max
        if r_max > setup.rank:
            raise ConfigError(f"method.rank_max = {r_max} exceeds model.rank = {setup.rank}; LEGEND keeps at most "
                             "model.rank slots per layer (raise model.rank or lower method.rank_max).")
        self.ranks_l = rank_distribution(self.L, min(settings.rank_min, r_max), r_max, settings.rank_budget)
        if not any(self.ranks_l.values()):
            raise ConfigError(f"method.rank_budget = {settings.rank_budget} leaves no LoRA in any layer")
        self.config: Configuration | None = None

    def global_ranks(self) -> dict[int, int]:
        return dict(self.ranks_l)

    def lowest_trainable_layer(self) -> int:
        layers = sorted(l for l, r in self.ranks_l.items() if r > 0)
        return layers[-min(self.s.depth_max or len(layers), len(layers))]

    def plan(self, rnd: int, ctx: RoundContext) -> tuple[list[DevicePlan], dict[str, Any]]:
        if self.config is None or (rnd - 1) % self.s.reconfigure_every == 0:
            self.config = configure(self.setup, self.s, self.ranks_l, ctx.profiles)
        cfg = self.config
        plans = [DevicePlan(d, cfg.ranks[d], tuple(sorted(cfg.ranks[d])), self.setup.local_steps) for d in ctx.available]
        return plans, config_metrics(cfg, ctx.available, self.L, self.s.traffic_budget_mb is not None)

    def aggregate(self, state: State, results: list[TrainResult], plans: dict[int, DevicePlan]) -> tuple[State, dict[str, Any]]:
        # x_l[j] = Σ_k n_k·m_{k,l,j}·u_{k,l}[j] / Σ_k n_k·m_{k,l,j}
        new = masked_slot_average(state, [r.update for r in results], [plans[r.device].ranks for r in results],
                                  [r.num_examples for r in results])
        return new, {}

    def state_dict(self) -> dict[str, Any]:
        c = self.config
        if c is None:
            return {"config": None}
        return {"config": {"ranks": [dict(r) for r in c.ranks], "predicted_s": list(c.predicted_s),
                           "target_s": c.target_s, "budget_met": c.budget_met}}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        c = d.get("config")
        self.config = None if c is None else Configuration(
            [{int(l): int(r) for l, r in rk.items()} for rk in c["ranks"]], list(c["predicted_s"]), c["target_s"],
            c["budget_met"])
