"""The strategy interface: what a method plans, what devices report, what the round returns.

A strategy is a small module with a `Settings` model and a `Strategy` class. Each global round the
engine calls `strategy.run_round(rnd, state, ctx)`; the strategy reads like a Flower server loop:
plan jobs for devices, `ctx.train(jobs)`, aggregate, repeat (HierFedLoRA's intra-group rounds), and
return the new server state with the round's simulated duration. The context hides whether devices
run in this process (the simulator) or on Flower SuperNodes, so the same strategy runs in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from hierfedlora.clock import ModelCost, compute_time, step_flops, transfer_time
from hierfedlora.fleet import DeviceProfile
from hierfedlora.lora_state import State
from hierfedlora.models import Layout


@dataclass(frozen=True)
class DevicePlan:
    """What one device does in one (intra-group) round.

    `ranks` maps every layer whose LoRA the device applies to its rank there (layers left out run
    without LoRA); `train_layers` is the subset whose LoRA trains. The device downloads the applied
    layers and the head (`download="all"`) or, when it already holds the frozen ones from earlier in
    this global round, only the trained layers and the head (`download="trained"`). It uploads the
    trained layers and the head. `link` is the network it talks over: "wan" to the parameter server,
    "lan" to its group aggregator. `extra` carries method-specific trainer options (e.g. a
    regulariser) that the local trainer understands.
    """

    device: int
    ranks: dict[int, int]
    train_layers: tuple[int, ...]
    steps: int
    link: str = "wan"
    download: str = "all"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [l for l in self.train_layers if self.ranks.get(l, 0) <= 0]
        if bad:
            raise ValueError(f"device {self.device}: trains layers {bad} that have no LoRA rank in its plan")
        if self.download not in ("all", "trained") or self.link not in ("wan", "lan"):
            raise ValueError(f"device {self.device}: bad download '{self.download}' or link '{self.link}'")


@dataclass(frozen=True)
class Job:
    """A plan and the server-convention state the device starts from (global or group model)."""

    plan: DevicePlan
    state: State


@dataclass
class TrainResult:
    device: int
    update: State  # trained layers (server convention, rank r) + head
    num_examples: int
    train_loss: float
    compute_s: float
    down_s: float
    up_s: float
    bytes_down: int
    bytes_up: int

    @property
    def time_s(self) -> float:
        return self.down_s + self.compute_s + self.up_s


@dataclass
class RoundReport:
    sim_time_s: float  # duration of this global round in simulated seconds
    train_loss: float
    participants: list[int]
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific metrics (arms, groups, ...)


@dataclass(frozen=True)
class SetupInfo:
    """What a strategy may know before training starts (SPEC §2-3)."""

    layout: Layout
    profiles: list[DeviceProfile]  # base profiles (before per-round fluctuation)
    num_examples: list[int]
    label_hists: np.ndarray  # [num_devices, num_classes] counts
    mean_seq_len: list[float]
    cost: ModelCost
    rank: int
    alpha: float
    local_steps: int
    batch_size: int
    bytes_per_param: int
    backward_ratio: float
    aggregator: str  # "edge" or "ps"
    seed: int

    @property
    def num_devices(self) -> int:
        return len(self.profiles)

    def predict_compute_s(self, device: int, trained_layers: int, steps: int | None = None, profile: DeviceProfile | None = None) -> float:
        """Expected compute time of `steps` local steps training the top `trained_layers` layers."""
        n = max(1, round(self.mean_seq_len[device]))
        b = min(self.batch_size, max(1, self.num_examples[device]))
        flops = step_flops(self.cost, [n] * b, self.layout.num_layers, trained_layers, self.backward_ratio)
        return compute_time(flops, profile or self.profiles[device]) * (steps or self.local_steps)

    def payload_bytes(self, ranks: dict[int, int], layers: list[int] | None = None) -> int:
        """Bytes of the LoRA slots of `layers` (all ranked layers when None) at `ranks`, plus the head."""
        ls = [l for l in (ranks if layers is None else layers) if ranks.get(l, 0) > 0]
        n = sum(ranks[l] * self.layout.params_per_rank(l) for l in ls) + self.layout.head_params()
        return n * self.bytes_per_param

    def predict_transfer_s(self, device: int, nbytes_down: int, nbytes_up: int, link: str = "wan", profile: DeviceProfile | None = None) -> float:
        up, down, lat = (profile or self.profiles[device]).link(link)
        return transfer_time(nbytes_down, down, lat) + transfer_time(nbytes_up, up, lat)


class RoundContext(Protocol):
    """The engine (or the Flower ServerApp) as a strategy sees it during one global round."""

    rnd: int
    available: list[int]  # devices that can take part this round
    profiles: list[DeviceProfile]  # profiles in force this round (fluctuating bandwidth)
    rng: np.random.Generator  # seeded for this round: strategy randomness goes through it

    def train(self, jobs: list[Job]) -> list[TrainResult]:
        """Run the jobs on their devices; devices that drop out return nothing."""

    def transfer(self, nbytes_up: int, nbytes_down: int, link: str, profile: DeviceProfile) -> float:
        """Meter a transfer between an aggregator and the PS; returns its simulated seconds."""

    def validate(self, state: State, ranks: dict[int, int] | None = None) -> tuple[float, float]:
        """(loss, accuracy) of a server-convention state on the validation split (not the test split)."""


class Strategy(Protocol):
    def global_ranks(self) -> dict[int, int]:
        """Rank R_l the server keeps in each layer (0 = no LoRA in that layer)."""

    def lowest_trainable_layer(self) -> int:
        """The lowest layer any device may ever train in this run (enables the frozen-prefix cache)."""

    def run_round(self, rnd: int, state: State, ctx: RoundContext) -> tuple[State, RoundReport]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


def weighted_loss(results: list[TrainResult]) -> float:
    n = sum(r.num_examples for r in results)
    return float(sum(r.train_loss * r.num_examples for r in results) / n) if n else float("nan")
