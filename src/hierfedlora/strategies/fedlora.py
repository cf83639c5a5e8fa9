"""FedLoRA / FedIT baseline (SPEC §2): every device trains LoRA in all layers at one rank, and the
server takes the data-weighted FedAvg of A, B and the head."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from hierfedlora.aggregate import slot_average
from hierfedlora.lora_state import State
from hierfedlora.strategies.base import DevicePlan, Job, RoundContext, RoundReport, SetupInfo, weighted_loss

NAME = "fedlora"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Strategy:
    def __init__(self, settings: Settings, setup: SetupInfo):
        self.setup = setup
        self.L = setup.layout.num_layers

    def global_ranks(self) -> dict[int, int]:
        return {l: self.setup.rank for l in range(self.L)}

    def lowest_trainable_layer(self) -> int:
        return 0

    def run_round(self, rnd: int, state: State, ctx: RoundContext) -> tuple[State, RoundReport]:
        ranks = self.global_ranks()
        plans = [DevicePlan(d, ranks, tuple(range(self.L)), self.setup.local_steps) for d in ctx.available]
        results = ctx.train([Job(p, state) for p in plans])
        if not results:  # everyone dropped: the model stays, the round still took the waiting time
            return state, RoundReport(0.0, float("nan"), [])
        # x ← Σ_k n_k x_k / Σ_k n_k  (every update holds every slot, so this is exactly FedAvg)
        new = slot_average(state, [r.update for r in results], [r.num_examples for r in results])
        return new, RoundReport(
            sim_time_s=max(r.time_s for r in results),
            train_loss=weighted_loss(results),
            participants=[r.device for r in results],
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass
