"""What every strategy shares: the protocol's defaults and the one-shot round, written once.

A strategy is a small module with `NAME`, a `Settings` model and a `Strategy` class (see
`registry`). Each global round the engine calls `strategy.run_round(rnd, state, ctx)`; the strategy
reads like a Flower server loop: plan jobs for devices, `ctx.train(jobs)`, aggregate, repeat
(HierFedLoRA's intra-group rounds), and return the new server state with the round's simulated
duration. The context hides whether devices run in this process or on Flower SuperNodes, so the
same strategy runs in both. The seam types live in `hierfedlora.protocol`.

Most methods (FedLoRA, top-k, HetLoRA, FlexLoRA, LEGEND) play one exchange per global round: every
available device gets a plan, trains once, and the server aggregates. `OneShotStrategy` is that
round; such a method is a `plan` function and an `aggregate` function.

Under secure aggregation (`fleet.secure_aggregation`) an exchange carries only each aggregator's
`Summed` updates: a method whose rule is a data-weighted mean of the updates says so with
`secure_aggregation_refusal = None` and aggregates from the sum (`OneShotStrategy.aggregate_sum`);
every other method names the reason it needs each update, and the config is refused with it.

Time comes from `Exchange.time_s`, never from the results alone: an exchange lasts until its last
update arrives or its aggregator stops waiting for a device that dropped out or missed the deadline
(design.md §3), so every method, one-shot or hierarchical, charges those waits the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from hierfedlora.lora_state import State
from hierfedlora.protocol import DevicePlan, Job, RoundContext, RoundReport, Summed, TrainResult


class StrategyBase:
    """Defaults of the optional parts of `protocol.Strategy`: no frozen layers promised, nothing
    to checkpoint, no extra outputs, no secure aggregation, central DP supported (a method whose
    rule is not a uniform per-key mean of an exchange's updates says why not in `no_central_dp`)."""

    secure_aggregation_refusal: ClassVar[str | None] = (
        "it has not declared that its aggregation is a data-weighted mean of the devices' updates")
    no_central_dp: ClassVar[str | None] = None

    def lowest_trainable_layer(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass

    def write_outputs(self, out_dir: Path, rows: list[dict[str, Any]]) -> None:
        pass

    @staticmethod
    def report_figures(rows: list[dict[str, Any]], out_dir: Path, label: str) -> list[str]:
        """Figures of one run of this method for a comparison report, written into `out_dir`;
        returns their file names (default: none)."""
        return []


class OneShotStrategy(StrategyBase):
    """A method whose global round is one exchange (see module docstring)."""

    def plan(self, rnd: int, ctx: RoundContext) -> tuple[list[DevicePlan], dict[str, Any]]:
        """Plans of the available devices, in `ctx.available` order, and the round's metrics known
        before training (e.g. each device's configuration)."""
        raise NotImplementedError

    def aggregate(self, state: State, results: list[TrainResult],
                  plans: dict[int, DevicePlan]) -> tuple[State, dict[str, Any]]:
        """The new server state from the devices' updates (`plans`: by device), and metrics that
        aggregation adds."""
        raise NotImplementedError

    def aggregate_sum(self, state: State, summed: Summed,
                      plans: dict[int, DevicePlan]) -> tuple[State, dict[str, Any]]:
        """The new server state from the securely summed updates (default: their FedAvg,
        x ← Σ_k n_k x_k / Σ_k n_k, `Summed.apply`); only called for a method that does not refuse."""
        return summed.apply(state), {}

    def run_round(self, rnd: int, state: State, ctx: RoundContext) -> tuple[State, RoundReport]:
        plans, metrics = self.plan(rnd, ctx)
        exchange = ctx.train([Job(p, state) for p in plans])
        results = exchange.results
        if not results:  # no update arrived in time: the model stays, the round still took the waiting time
            return state, RoundReport(exchange.time_s(), float("nan"), [], metrics)
        by_device = {p.device: p for p in plans}
        if exchange.sums is not None:  # secure aggregation: the PS holds only the sum (aggregator 0)
            new, more = self.aggregate_sum(state, exchange.sums[0], by_device)
        else:
            new, more = self.aggregate(state, results, by_device)
            new = ctx.release(new, results)  # central DP: the aggregator's noise on the mean (else as is)
        return new, RoundReport(
            sim_time_s=exchange.time_s(),  # the last update to arrive, or the longest wait for a missing one
            train_loss=weighted_loss(results),
            participants=[r.device for r in results],
            extra={**metrics, **more},
        )


def weighted_loss(results: list[TrainResult]) -> float:
    """Σ_k n_k loss_k / Σ_k n_k over the devices that reported (NaN for none)."""
    n = sum(r.num_examples for r in results)
    return float(sum(r.train_loss * r.num_examples for r in results) / n) if n else math.nan
