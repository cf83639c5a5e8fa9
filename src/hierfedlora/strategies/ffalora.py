"""FFA-LoRA (Sun et al., 2024, "Improving LoRA in Privacy-preserving Federated Learning"): every
device keeps the LoRA A factors frozen at the shared, seeded initialisation; only B and the head
train, and the server takes their data-weighted FedAvg.

With A fixed and identical everywhere, averaging B is averaging the updates themselves:

    B ← Σ_k n_k B_k / Σ_k n_k   ⇒   (α/r)·B·A = Σ_k n_k (α/r)·B_k·A / Σ_k n_k

i.e. mean_k(B_k)·A = mean_k(B_k·A), exactly, where FedLoRA's mean_k(B_k)·mean_k(A_k) is not the
mean of the products. A device uploads only B and the head (`DevicePlan.frozen_factors`), and once
it holds A (from its first exchange) downloads only B and the head too (`download="trained"`).
The simulated clock charges the same compute as training both factors: the backward still flows
through A's output, and the cost model has no per-factor term (only A's own gradient, r·in per
token, is saved).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from hierfedlora.aggregate import slot_average
from hierfedlora.lora_state import State
from hierfedlora.protocol import DevicePlan, RoundContext, SetupInfo, TrainResult
from hierfedlora.strategies.base import OneShotStrategy

NAME = "ffalora"
FROZEN = ("A",)  # the factors no device trains


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Strategy(OneShotStrategy):
    secure_aggregation_refusal = None  # FedAvg: the mean of the sum (`aggregate_sum`)

    def __init__(self, settings: Settings, setup: SetupInfo):
        self.setup = setup
        self.L = setup.layout.num_layers
        self.holds_a: set[int] = set()  # devices that have downloaded A (it never changes after)

    def global_ranks(self) -> dict[int, int]:
        return {l: self.setup.rank for l in range(self.L)}

    def plan(self, rnd: int, ctx: RoundContext) -> tuple[list[DevicePlan], dict[str, Any]]:
        ranks, layers = self.global_ranks(), tuple(range(self.L))
        plans = [DevicePlan(d, ranks, layers, self.setup.local_steps, download="trained" if d in self.holds_a else "all",
                            frozen_factors=FROZEN) for d in ctx.available]
        self.holds_a.update(ctx.available)  # a device receives its model even if it then drops out
        return plans, {}

    def aggregate(self, state: State, results: list[TrainResult], plans: dict[int, DevicePlan]) -> tuple[State, dict[str, Any]]:
        # B ← Σ_k n_k B_k / Σ_k n_k (and the head); A is in no update, so it keeps its initial value
        return slot_average(state, [r.update for r in results], [r.num_examples for r in results]), {}

    def state_dict(self) -> dict[str, Any]:
        return {"holds_a": sorted(self.holds_a)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.holds_a = set(d["holds_a"])
