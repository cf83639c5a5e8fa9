"""FlexLoRA baseline (design.md §2; Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024): devices train LoRA in every layer at their
own rank r_k; the server forms the full update ΔW_l = Σ_k p_k·ΔW_{k,l} (p_k ∝ data size), takes its
SVD and keeps rank-R factors, of which each device receives the first r_k slots: the best rank-r_k
approximation of the aggregate (Eckart-Young).

* **Ranks from capacity**, exactly as in `hetlora` (`capacity_ranks`, log-linear between r_min for
  the slowest and r_max for the fastest device), so the two baselines differ only in aggregation.
* **Scale.** Updates arrive in the server convention, where a rank-r_k update's (α/R_l)·B_k·A_k is the
  device's own (α/r_k)-scaled ΔW (`lora_state`); the sum is taken over those products, never over the
  factors, so devices of different ranks add up correctly.
* **Singular-value split.** ΔW = U S Vᵀ is stored as B = sqrt(R/α)·U√S and A = sqrt(R/α)·√S Vᵀ
  (`aggregate.svd_factors`): (α/R)·B·A is the rank-R truncation, and `to_device`'s B rescale by r/R
  turns the first r_k slots into a genuine rank-r_k LoRA with scale α/r_k whose ΔW is the rank-r_k
  truncation. √S goes into both factors so A and B start local training at the same scale (each
  factor's gradient is proportional to the other); any split gives the same ΔW.
* Slots beyond the rank of ΔW come back as zero in both A and B, and a slot with A = B = 0 gets no
  gradient on a device. Generically the aggregate's rank is at least max_k r_k (it sums the devices'
  different rank-r_k updates), so every slot a device uses is live.
"""

from __future__ import annotations

from typing import Any

from hierfedlora.aggregate import svd_redistribute
from hierfedlora.lora_state import State
from hierfedlora.protocol import DevicePlan, RoundContext, SetupInfo, TrainResult
from hierfedlora.strategies.base import OneShotStrategy
from hierfedlora.strategies.hetlora import RankSettings, capacity_ranks, device_capacity, resolve_rank_bounds

NAME = "flexlora"


class Settings(RankSettings):
    """rank_min, rank_max, capacity: as HetLoRA's (see `hetlora.RankSettings`)."""


class Strategy(OneShotStrategy):
    secure_aggregation_refusal = (
        "it averages the devices' full products ΔW_k = B_k·A_k (out × in per module), not their factors: a secure "
        "sum would need each device to upload its weighted ΔW, in·out/(r_k·(in+out)) times its LoRA upload "
        "(24× for MiniLM's 384×384 modules at r_k = 8), which hierfedlora does not do")
    no_central_dp = ("its aggregation is an SVD of the weighted sum of the updates' ΔW, not a per-key mean of the "
                     "clipped factors")

    def __init__(self, settings: Settings, setup: SetupInfo):
        self.setup = setup
        self.L = setup.layout.num_layers
        self.rank_min, self.rank_max = resolve_rank_bounds(settings.rank_min, settings.rank_max, setup.rank, NAME)
        self.ranks = capacity_ranks(device_capacity(setup, settings.capacity, self.rank_max), self.rank_min, self.rank_max)

    def global_ranks(self) -> dict[int, int]:
        return {l: self.rank_max for l in range(self.L)}

    def plan(self, rnd: int, ctx: RoundContext) -> tuple[list[DevicePlan], dict[str, Any]]:
        plans = [DevicePlan(d, {l: self.ranks[d] for l in range(self.L)}, tuple(range(self.L)), self.setup.local_steps)
                 for d in ctx.available]
        return plans, {"device_config": [{"device": d, "depth": self.L, "ranks": [self.ranks[d]] * self.L} for d in ctx.available]}

    def aggregate(self, state: State, results: list[TrainResult], plans: dict[int, DevicePlan]) -> tuple[State, dict[str, Any]]:
        # ΔW_l = Σ_k p_k ΔW_{k,l},  p_k = n_k / Σ n;  A_l, B_l = SVD_R(ΔW_l)
        new = svd_redistribute(state, [r.update for r in results], [plans[r.device].ranks for r in results],
                               [r.num_examples for r in results], self.setup.alpha, self.global_ranks())
        return new, {}
