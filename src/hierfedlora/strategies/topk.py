"""FedLoRA at depth d (a baseline, and the benchmark's W2 workload): LoRA only in the top `depth`
layers, trained by every device; FedAvg of A, B and the head. Layers below never change, so the
engine computes them once per example (prefix cache, `lowest_trainable_layer() = L - depth`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hierfedlora.aggregate import slot_average
from hierfedlora.errors import ConfigError
from hierfedlora.lora_state import State
from hierfedlora.protocol import DevicePlan, RoundContext, SetupInfo, TrainResult
from hierfedlora.strategies.base import OneShotStrategy

NAME = "fedlora_topk"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    depth: int = Field(2, ge=1, description="LoRA depth d: the top d layers (counted from the output) get LoRA and train.")


class Strategy(OneShotStrategy):
    secure_aggregation_refusal = None  # FedAvg: the mean of the sum (`aggregate_sum`)

    def __init__(self, settings: Settings, setup: SetupInfo):
        self.setup = setup
        self.L = setup.layout.num_layers
        if settings.depth > self.L:
            raise ConfigError(f"method.depth = {settings.depth} exceeds the model's {self.L} layers")
        self.layers = tuple(range(self.L - settings.depth, self.L))

    def global_ranks(self) -> dict[int, int]:
        return {l: self.setup.rank for l in self.layers}

    def lowest_trainable_layer(self) -> int:
        return self.layers[0]

    def plan(self, rnd: int, ctx: RoundContext) -> tuple[list[DevicePlan], dict[str, Any]]:
        ranks = self.global_ranks()
        return [DevicePlan(d, ranks, self.layers, self.setup.local_steps) for d in ctx.available], {}

    def aggregate(self, state: State, results: list[TrainResult], plans: dict[int, DevicePlan]) -> tuple[State, dict[str, Any]]:
        # x ← Σ_k n_k x_k / Σ_k n_k over the trained layers and the head
        return slot_average(state, [r.update for r in results], [r.num_examples for r in results]), {}
