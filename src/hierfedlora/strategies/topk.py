"""FedLoRA at depth d (a baseline, and the benchmark's W2 workload): LoRA only in the top `depth`
layers, trained by every device; FedAvg of A, B and the head. Layers below never change, so the
engine computes them once per example (prefix cache, `lowest_trainable_layer() = L - depth`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hierfedlora.aggregate import slot_average
from hierfedlora.lora_state import State
from hierfedlora.strategies.base import DevicePlan, Job, RoundContext, RoundReport, SetupInfo, weighted_loss

NAME = "fedlora_topk"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    depth: int = Field(2, ge=1, description="LoRA depth d: the top d layers (counted from the output) get LoRA and train.")


class Strategy:
    def __init__(self, settings: Settings, setup: SetupInfo):
        self.setup = setup
        self.L = setup.layout.num_layers
        if settings.depth > self.L:
            raise ValueError(f"method.depth = {settings.depth} exceeds the model's {self.L} layers")
        self.layers = tuple(range(self.L - settings.depth, self.L))

    def global_ranks(self) -> dict[int, int]:
        return {l: self.setup.rank for l in self.layers}

    def lowest_trainable_layer(self) -> int:
        return self.layers[0]

    def run_round(self, rnd: int, state: State, ctx: RoundContext) -> tuple[State, RoundReport]:
        ranks = self.global_ranks()
        plans = [DevicePlan(d, ranks, self.layers, self.setup.local_steps) for d in ctx.available]
        results = ctx.train([Job(p, state) for p in plans])
        if not results:
            return state, RoundReport(0.0, float("nan"), [])
        # x ← Σ_k n_k x_k / Σ_k n_k over the trained layers and the head
        new = slot_average(state, [r.update for r in results], [r.num_examples for r in results])
        return new, RoundReport(max(r.time_s for r in results), weighted_loss(results), [r.device for r in results])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass
