"""The seams of hierfedlora, declared in one place: what crosses between the layers.

Data flows one way (docs/design.md): config -> data & model -> fleet -> a `Strategy` plans a round as
`Job`s -> an `Executor` runs each as a `DeviceJob` on its device and returns a `JobOutput` -> the
engine books time and traffic into a `TrainResult` (an `Exchange` of them, with the devices that
missed it) -> the strategy aggregates and returns a `RoundReport`. Under secure aggregation
(`fleet.secure_aggregation`) the exchange carries, per aggregator, only the `Summed` updates of its
devices instead of each update. Every type here is plain data or a protocol; this module imports no model code, so
strategies, the device runtime, the engine and the Flower adapter can all depend on it and on
nothing above it. A capability that a strategy or executor may have is declared here with its
default (`strategies.base.StrategyBase`), never probed with `hasattr`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch

from hierfedlora.clock import ModelCost, compute_time, step_flops, train_memory_bytes, transfer_time
from hierfedlora.fleet import DeviceProfile
from hierfedlora.lora_state import State, head_and_layers, parse_key
from hierfedlora.metrics import accuracy, macro_f1


@dataclass(frozen=True)
class Layout:
    """What a LoRA state looks like for this model: layers, targeted modules and their shapes."""

    num_layers: int
    modules: dict[str, tuple[int, int]]  # module path inside a layer -> (in_features, out_features)
    head: dict[str, tuple[int, ...]]  # head param name -> shape

    def params_per_rank(self, layer: int) -> int:
        """LoRA parameters of one rank slot in one layer (A row + B column, over modules)."""
        return sum(i + o for i, o in self.modules.values())

    def head_params(self) -> int:
        n = 0
        for s in self.head.values():
            k = 1
            for d in s:
                k *= d
            n += k
        return n


@dataclass(frozen=True)
class DevicePlan:
    """What one device does in one (intra-group) round.

    `ranks` maps every layer whose LoRA the device applies to its rank there (layers left out run
    without LoRA); `train_layers` is the subset whose LoRA trains, and `frozen_factors` names the
    LoRA factors ("A", "B") that stay fixed even there (FFA-LoRA freezes A; default: both train).
    What trains is what the device uploads (`uploaded`): the trained layers' trained factors and
    the head. It downloads the applied layers and the head (`download="all"`) or, when it already
    holds the rest from an earlier exchange, only what it trains (`download="trained"`). `link` is
    the network it talks over: "wan" to the parameter server, "lan" to its group aggregator.
    `options` carries method-specific trainer options (e.g. a regulariser), each a name that its
    method declares in `TRAINER_OPTIONS` (see `registry`).
    """

    device: int
    ranks: dict[int, int]
    train_layers: tuple[int, ...]
    steps: int
    link: str = "wan"
    download: str = "all"
    options: dict[str, Any] = field(default_factory=dict)
    frozen_factors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [l for l in self.train_layers if self.ranks.get(l, 0) <= 0]
        if bad:
            raise ValueError(f"device {self.device}: trains layers {bad} that have no LoRA rank in its plan")
        if self.download not in ("all", "trained") or self.link not in ("wan", "lan"):
            raise ValueError(f"device {self.device}: bad download '{self.download}' or link '{self.link}'")
        if not set(self.frozen_factors) <= {"A", "B"}:
            raise ValueError(f"device {self.device}: frozen_factors {self.frozen_factors} names a factor other than A, B")

    def uploaded(self, payload: State) -> list[str]:
        """The keys of `payload` the device trains and sends back: the head's and the trained
        layers' factors but those in `frozen_factors`."""
        frozen = set(self.frozen_factors)
        return [k for k in head_and_layers(payload, self.train_layers) if (p := parse_key(k)) is None or p[2] not in frozen]

    def downloaded(self, payload: State) -> list[str]:
        """The keys of `payload` the device downloads (and the meter counts): all of them, or with
        `download="trained"` only what it trains (`uploaded`)."""
        return list(payload) if self.download == "all" else self.uploaded(payload)


@dataclass(frozen=True)
class Job:
    """A plan and the server-convention state the device starts from (global or group model).
    `aggregator` names who aggregates the update (one-shot methods: 0, the PS; HierFedLoRA: the
    group); a secure aggregation sums the updates of each aggregator's jobs together."""

    plan: DevicePlan
    state: State
    aggregator: int = 0


@dataclass
class TrainResult:
    device: int
    update: State | None  # trained layers (server convention, rank r) + head; None under secure aggregation
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


@dataclass(frozen=True)
class Missed:
    """A device whose update its aggregator waited for and did not aggregate (design.md §3,
    "Dropouts and the deadline"): it `"dropped"` out after receiving its model, or it is a
    `"straggler"` whose update would have arrived after `fleet.deadline_s`. `wait_s` is how long
    the aggregator waited for it, counted from sending it its model; `bytes_down` / `bytes_up`
    are what it moved (and the meter booked)."""

    device: int
    reason: str  # "dropped", "straggler", or "alone" (secure aggregation: the only device of its aggregator, not asked)
    wait_s: float
    bytes_down: int
    bytes_up: int = 0


@dataclass(frozen=True)
class Summed:
    """The updates of one aggregator's devices as a secure aggregation gives them: only their
    data-weighted mean and total weight, never one update on its own (docs/flower.md, SecAgg+).

    mean = Σ_k n_k·x_k / Σ_k n_k,  weight = Σ_k n_k   over `devices`, key by key (server convention)
    Every device of a sum uploads the same keys at the same shapes, so this is FedAvg exactly.
    """

    mean: State
    weight: float
    devices: tuple[int, ...]

    def apply(self, base: State) -> State:
        """`base` with the summed keys replaced by their mean: the FedAvg of the devices' updates
        (`aggregate.slot_average` of full-rank updates), keys nobody sent unchanged."""
        return {k: self.mean[k].to(v.dtype) if k in self.mean else v for k, v in base.items()}


@dataclass
class Exchange:
    """What one `RoundContext.train` call gives back: the updates that arrived in time
    (`results`, what the aggregator aggregates) and the devices it waited for in vain (`missed`).
    Under secure aggregation `sums` holds each aggregator's `Summed` (by `Job.aggregator`) and the
    results carry what the server still sees of each device (who replied, loss, examples, time,
    bytes) with `update = None`; otherwise `sums` is None.

    An aggregator's exchange lasts until the last update arrives or the last wait ends, so the
    duration comes from both lists: a dropped device or a straggler never shortens an exchange.
    """

    results: list[TrainResult]
    missed: list[Missed] = field(default_factory=list)
    sums: dict[int, Summed] | None = None

    def time_s(self, devices: Collection[int] | None = None) -> float:
        """Duration of the exchange of `devices` (all when None), from sending the models:
        T = max(max_k t_k over arrived updates, max_j w_j over missed devices); 0 for none."""
        pick = None if devices is None else set(devices)
        times = ([r.time_s for r in self.results if pick is None or r.device in pick]
                 + [m.wait_s for m in self.missed if pick is None or m.device in pick])
        return float(max(times, default=0.0))


@dataclass
class RoundReport:
    sim_time_s: float  # duration of this global round in simulated seconds
    train_loss: float
    participants: list[int]
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific metrics (arms, groups, ...)


@dataclass(frozen=True)
class SetupInfo:
    """What a strategy may know before training starts (design.md §2-3)."""

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
    mean_response_len: list[float] | None = None  # instruction tuning: tokens the loss counts per example
    metric: str = "accuracy"  # `run.metric`: what a score-based reward measures (`Scores.metric`)
    # [num_devices, hidden]: each device's mean token embedding under the frozen base model (prompt
    # tokens for instruction data), computed on the first call only, so a strategy that never asks
    # costs nothing; a label-free signal for grouping (`private_grouping`). None: not available.
    device_embeddings: Callable[[], np.ndarray] | None = None


    @property
    def num_devices(self) -> int:
        return len(self.profiles)

    def predict_compute_s(self, device: int, trained_layers: int, steps: int | None = None, profile: DeviceProfile | None = None) -> float:
        """Expected compute time of `steps` local steps training the top `trained_layers` layers."""
        n = max(1, round(self.mean_seq_len[device]))
        b = min(self.batch_size, max(1, self.num_examples[device]))
        head = round(self.mean_response_len[device]) * b if self.mean_response_len else 0
        flops = step_flops(self.cost, [n] * b, self.layout.num_layers, trained_layers, self.backward_ratio, head)
        return compute_time(flops, profile or self.profiles[device]) * (steps or self.local_steps)

    def predict_memory_bytes(self, device: int, ranks: dict[int, int], trained_layers: int) -> float:
        """Estimated peak memory of training the top `trained_layers` layers with LoRA at `ranks`
        (`clock.train_memory_bytes`, at the device's batch and mean example length)."""
        n = max(1, round(self.mean_seq_len[device]))
        b = min(self.batch_size, max(1, self.num_examples[device]))
        applied = sum(ranks[l] * self.layout.params_per_rank(l) for l in ranks if ranks[l] > 0)
        top = sorted((l for l in ranks if ranks[l] > 0), reverse=True)[:trained_layers]
        trained = sum(ranks[l] * self.layout.params_per_rank(l) for l in top) + self.layout.head_params()
        head = round(self.mean_response_len[device]) * b if self.mean_response_len else 0
        return train_memory_bytes(self.cost, applied + self.layout.head_params(), trained, len(top), b, n, head)

    def fits_memory(self, device: int, ranks: dict[int, int], trained_layers: int,
                    profile: DeviceProfile | None = None) -> bool:
        """Whether that plan's estimated peak fits the device's memory (`memory_gb`)."""
        return self.predict_memory_bytes(device, ranks, trained_layers) <= (profile or self.profiles[device]).memory_gb * 1e9

    def payload_bytes(self, ranks: dict[int, int], layers: list[int] | None = None) -> int:
        """Bytes of the LoRA slots of `layers` (all ranked layers when None) at `ranks`, plus the head."""
        ls = [l for l in (ranks if layers is None else layers) if ranks.get(l, 0) > 0]
        n = sum(ranks[l] * self.layout.params_per_rank(l) for l in ls) + self.layout.head_params()
        return n * self.bytes_per_param

    def predict_transfer_s(self, device: int, nbytes_down: int, nbytes_up: int, link: str = "wan", profile: DeviceProfile | None = None) -> float:
        up, down, lat = (profile or self.profiles[device]).link(link)
        return transfer_time(nbytes_down, down, lat) + transfer_time(nbytes_up, up, lat)


class DeviceJob(NamedTuple):
    """A job as its device receives it: the plan, the payload in device convention (rank r_k,
    `lora_state.to_device`) and `call`, how many jobs this device already ran this global round
    (batches and dropout seeds derive from (seed, round, device, call))."""

    plan: DevicePlan
    payload: State
    call: int


@dataclass
class JobOutput:
    """What a device returns for one job (under secure aggregation without its update: the
    executor hands over the aggregator's sum instead, `Executor.run_summed`)."""

    update: State | None  # device convention: trained layers + head
    train_loss: float
    flops: float  # FLOPs of the local steps, from the real token lengths (for the simulated clock)
    num_examples: int
    # local DP: ‖Δ‖₂ of the update before clipping, for the simulator's dp_update_norm (a diagnostic
    # for choosing the bound, not privatised: a Flower SuperNode does not send it)
    update_norm: float | None = None


@dataclass(frozen=True)
class Scores:
    """One evaluation pass of a model over a split: mean loss, accuracy, and for classes the
    confusion matrix (`metrics`: rows true, columns predicted) with its macro-F1, from the same
    predictions. For an instruction set with open answers `acc` is its score (ROUGE-L) and there
    are no classes (`macro_f1`, `confusion` None)."""

    loss: float
    acc: float
    macro_f1: float | None = None
    confusion: tuple[tuple[int, ...], ...] | None = None  # counts; a tuple so two Scores compare with ==

    @classmethod
    def of_classes(cls, loss: float, confusion: np.ndarray) -> "Scores":
        """Accuracy and macro-F1 from the confusion counts of the pass that gave `loss`."""
        return cls(loss, accuracy(confusion), macro_f1(confusion), tuple(map(tuple, np.asarray(confusion).tolist())))

    def metric(self, name: str) -> float:
        """The score `run.metric` names: "accuracy" or "macro_f1"."""
        if name == "accuracy":
            return self.acc
        if self.macro_f1 is None:
            raise ValueError("macro_f1 needs class labels; this evaluation has none (open answers)")
        return self.macro_f1


@dataclass(frozen=True)
class LocalDP:
    """Local differential privacy of a device's update (`privacy.dp = "local"`): its change to the
    uploaded tensors clipped to L2 norm `clip_norm` (C), then N(0, (σ·C)²) added per coordinate,
    σ = `noise_multiplier`, before upload (`device.train.privatise`)."""

    clip_norm: float
    noise_multiplier: float


@dataclass(frozen=True)
class LocalTraining:
    """The settings of local training that every device job shares (from `train.*`, `run.seed`
    and `fleet.backward_ratio`), one object instead of a row of arguments."""

    seed: int
    batch_size: int
    lr: float
    weight_decay: float
    backward_ratio: float
    lockstep: int = 1  # devices of one plan shape trained together (fast path; 1 = one at a time)
    # loss terms by name in `DevicePlan.options` (`registry.trainer_options`): f(model, plan, value)
    regularisers: dict[str, Callable] = field(default_factory=dict)
    local_dp: LocalDP | None = None  # `privacy.dp = "local"`: every job's update is privatised on the device


class RoundContext(Protocol):
    """The engine (or the Flower ServerApp) as a strategy sees it during one global round."""

    rnd: int
    available: list[int]  # devices that can take part this round
    profiles: list[DeviceProfile]  # profiles in force this round (fluctuating bandwidth)
    rng: np.random.Generator  # seeded for this round: strategy randomness goes through it

    def train(self, jobs: list[Job]) -> Exchange:
        """Run the jobs on their devices as one exchange: the updates that arrive in time, and
        the devices that dropped out or missed the deadline with how long each was waited for."""

    def transfer(self, nbytes_up: int, nbytes_down: int, link: str, profile: DeviceProfile) -> float:
        """Meter a transfer between an aggregator and the PS; returns its simulated seconds."""

    def validate(self, state: State, ranks: dict[int, int] | None = None) -> Scores:
        """Loss, accuracy and macro-F1 of a server-convention state on the validation split (not the test split)."""

    def release(self, state: State, results: list[TrainResult]) -> State:
        """The aggregate `state` of `results` as its aggregator releases it. A strategy passes every
        uniform average it forms of an exchange's updates through here. Under central DP
        (`privacy.dp = "central"`: the updates arrived clipped and weighted 1) it adds
        N(0, (σ·C/m)²) to every coordinate of the keys the m = len(results) updates hold, and
        counts one release for each of their devices; otherwise it returns `state` itself."""


class Strategy(Protocol):
    """A method (one module in `strategies/`). `strategies.base.StrategyBase` gives the defaults
    of everything below but `global_ranks` and `run_round`."""

    # why the method cannot take central DP (`privacy.dp = "central"`), None when it can: its
    # aggregation must be a uniform per-key mean of all of an exchange's updates, each passed
    # through `RoundContext.release` (default None; the engine refuses central DP otherwise)
    no_central_dp: ClassVar[str | None]

    def global_ranks(self) -> dict[int, int]:
        """Rank R_l the server keeps in each layer (0 = no LoRA in that layer)."""

    def lowest_trainable_layer(self) -> int:
        """The lowest layer any device may ever train in this run (default 0). Layers below it
        never change, which lets the fast path cache their output (`fast.prefix_cache`)."""

    def run_round(self, rnd: int, state: State, ctx: RoundContext) -> tuple[State, RoundReport]: ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume the method exactly (default: nothing)."""

    def load_state_dict(self, d: dict[str, Any]) -> None: ...

    def write_outputs(self, out_dir: Path, rows: list[dict[str, Any]]) -> None:
        """Method-specific files of a finished run (default: none; HierFedLoRA: arms.png, grouping.json)."""

    # Why the method cannot aggregate an exchange from its `Exchange.sums` (the data-weighted mean
    # per aggregator), or None when it can (`fleet.secure_aggregation`). A class attribute, so a
    # config is refused before anything is built (default: refused, the method never said it can).
    secure_aggregation_refusal: ClassVar[str | None]


class Executor(Protocol):
    """Runs device jobs: in this process, in worker processes (`fast.workers`), or on Flower
    SuperNodes (`flower.executor`). Every executor evaluates too, so the engine never asks which
    one it has."""

    def run(self, rnd: int, jobs: list[DeviceJob]) -> list[JobOutput | None]:
        """Each job's output, in order (None: the device failed or dropped out while working)."""

    def evaluate(self, payload: State, ranks: dict[int, int], batches: list[dict[str, torch.Tensor]]) -> Scores:
        """Mean cross-entropy, accuracy, macro-F1 and confusion counts of a device-convention payload
        over pre-collated batches, from one pass."""

    def run_summed(self, rnd: int, jobs: list[DeviceJob],
                   aggregators: list[int]) -> tuple[list[JobOutput | None], dict[int, Summed]]:
        """The jobs under secure aggregation: each output without its update, and per aggregator
        (`aggregators[i]` is job i's) the `Summed` of its devices' updates, in device convention.
        Default (`ExecutorBase`): `run`, then a plain sum here, which is what a secure sum computes."""

    def close(self) -> None:
        """Release processes or connections (idempotent)."""


class ExecutorBase:
    """The default of `Executor.run_summed` for executors that see each update (in process, worker
    processes): the simulated secure sum. The Flower executor runs Flower's SecAgg+ instead."""

    def run(self, rnd: int, jobs: list[DeviceJob]) -> list[JobOutput | None]:
        raise NotImplementedError

    def run_summed(self, rnd: int, jobs: list[DeviceJob],
                   aggregators: list[int]) -> tuple[list[JobOutput | None], dict[int, Summed]]:
        outputs = self.run(rnd, jobs)
        return ([None if o is None else JobOutput(None, o.train_loss, o.flops, o.num_examples) for o in outputs],
                plain_sums(outputs, jobs, aggregators))


def plain_sums(outputs: list[JobOutput | None], jobs: list[DeviceJob], aggregators: list[int]) -> dict[int, Summed]:
    """Per aggregator, mean = Σ n_k·x_k / Σ n_k over the outputs that arrived (`aggregate.fedavg`,
    in the order of `slot_average`, so the mean is bit for bit the per-device FedAvg)."""
    from hierfedlora.aggregate import fedavg

    sums = {}
    for a in dict.fromkeys(aggregators):
        mine = [(o, j) for o, j, g in zip(outputs, jobs, aggregators) if g == a and o is not None]
        if mine:
            sums[a] = Summed(fedavg([o.update for o, _ in mine], [o.num_examples for o, _ in mine]),
                             float(sum(o.num_examples for o, _ in mine)), tuple(j.plan.device for _, j in mine))
    return sums
