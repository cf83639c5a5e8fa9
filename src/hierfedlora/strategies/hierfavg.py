"""Hierarchical FedAvg of LoRA (a baseline): HierFedLoRA's topology without its ideas.

The same edge aggregators and link classes as HierFedLoRA (`fleet.aggregator`), but the groups are
drawn at random (seeded, equal sizes ±1), every device trains LoRA in every layer, and each group
runs a fixed τ intra-group rounds of FedAvg per global round; the PS then averages the groups'
models weighted by their data (with every layer trained, layer-wise aggregation is plain FedAvg).
It is HierFedLoRA with `grouping = "random"`, `fixed_depth = L`, `fixed_tau = τ`, so the two differ
in exactly what grouping, the bandit and depth add; HierFedLoRA run with `fleet.aggregator = "ps"`
separates in turn what edge aggregation adds. With one group, τ = 1 and `fleet.aggregator = "ps"`
it is FedLoRA (tests/test_strategies.py).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hierfedlora.protocol import SetupInfo
from hierfedlora.strategies import hierfedlora

NAME = "hierfavg"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_groups: int = Field(4, ge=1, description="K: number of random, equal-size device groups (at most fleet.num_devices).")
    tau: int = Field(2, ge=1, description="τ: intra-group rounds of FedAvg per global round.")


class Strategy(hierfedlora.Strategy):
    def __init__(self, settings: Settings, setup: SetupInfo):
        super().__init__(hierfedlora.Settings(num_groups=settings.num_groups, grouping="random",
                                              fixed_depth=setup.layout.num_layers, fixed_tau=settings.tau), setup)
