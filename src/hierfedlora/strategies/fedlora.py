"""FedLoRA / FedIT baseline (design.md §2): every device trains LoRA in all layers at one rank, and the
server takes the data-weighted FedAvg of A, B and the head."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from hierfedlora.aggregate import slot_average
from hierfedlora.lora_state import State
from hierfedlora.protocol import DevicePlan, RoundContext, SetupInfo, TrainResult
from hierfedlora.strategies.base import OneShotStrategy

NAME = "fedlora"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Strategy(OneShotStrategy):
    secure_aggregation_refusal = None  # FedAvg: the mean of the sum (`aggregate_sum`)

    def __init__(self, settings: Settings, setup: SetupInfo):
        self.setup = setup
        self.L = setup.layout.num_layers

    def global_ranks(self) -> dict[int, int]:
        return {l: self.setup.rank for l in range(self.L)}

    def plan(self, rnd: int, ctx: RoundContext) -> tuple[list[DevicePlan], dict[str, Any]]:
        ranks = self.global_ranks()
        return [DevicePlan(d, ranks, tuple(range(self.L)), self.setup.local_steps) for d in ctx.available], {}

    def aggregate(self, state: State, results: list[TrainResult], plans: dict[int, DevicePlan]) -> tuple[State, dict[str, Any]]:
        # x ← Σ_k n_k x_k / Σ_k n_k  (every update holds every slot, so this is exactly FedAvg)
        return slot_average(state, [r.update for r in results], [r.num_examples for r in results]), {}
