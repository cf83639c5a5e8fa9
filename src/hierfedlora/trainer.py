"""Local training on one device (SPEC §2.3): LoRA of the planned layers + head, layers below frozen.

Pure in what matters: the result depends only on the payload, the plan, the batches and the seed,
so the simulator, a resumed run and a Flower SuperNode all compute the same update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hierfedlora.clock import step_flops
from hierfedlora.data import collate
from hierfedlora.lora_state import State
from hierfedlora.models import LocalModel
from hierfedlora.strategies.base import DevicePlan

# name in DevicePlan.extra -> f(model, plan, value) -> loss term; methods register their own
Regulariser = Callable[[LocalModel, DevicePlan, object], torch.Tensor]
REGULARISERS: dict[str, Regulariser] = {}


def sample_batches(positions: np.ndarray, steps: int, batch_size: int, seed: tuple[int, ...]) -> list[np.ndarray]:
    """`steps` batches of positions: a seeded permutation of the device's data, cycled as needed."""
    rng = np.random.default_rng(list(seed))
    b = min(batch_size, len(positions))
    need = steps * b
    order = np.concatenate([rng.permutation(positions) for _ in range(-(-need // len(positions)))])
    return [order[i * b:(i + 1) * b] for i in range(steps)]


def job_picks(positions: np.ndarray, plan: DevicePlan, *, seed: int, rnd: int, call: int,
              batch_size: int) -> list[np.ndarray]:
    """The batches (example positions) a device's job trains on."""
    return sample_batches(positions, plan.steps, batch_size, (seed, 4004, rnd, plan.device, call))


def torch_seed(seed: tuple[int, ...]) -> int:
    return int(np.random.SeedSequence(list(seed)).generate_state(1)[0])


def local_train(model: LocalModel, payload: State, plan: DevicePlan, batches: list[dict[str, torch.Tensor]],
                lr: float, weight_decay: float, seed: int) -> tuple[State, float]:
    """Train the plan's layers for len(batches) steps with AdamW; returns (update in device
    convention: trained layers + head, mean training loss)."""
    model.load(payload, plan.ranks, plan.train_layers)
    lowest = min(plan.train_layers) if plan.train_layers else model.num_layers
    model.train_mode(lowest)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.warm_prefix(batches)
    torch.manual_seed(seed)
    total = 0.0
    for batch in batches:
        loss = F.cross_entropy(model.logits(batch), batch["labels"].to(model.device))
        total += float(loss.detach())
        for name, value in plan.extra.items():
            if name in REGULARISERS:
                loss = loss + REGULARISERS[name](model, plan, value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.extract(plan.train_layers, plan.ranks), total / max(1, len(batches))


def make_batches(ids: list[np.ndarray], labels: np.ndarray, picks: list[np.ndarray], pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches; `index` names each example (its position in `ids`) for the prefix cache."""
    return [{**collate([ids[i] for i in p], labels[p], pad_id), "index": torch.as_tensor(p)} for p in picks]


@torch.no_grad()
def batch_scores(model: LocalModel, batches: list[dict[str, torch.Tensor]]) -> list[tuple[float, int, int]]:
    """(summed cross-entropy, correct, examples) of the currently loaded model, per batch."""
    model.eval_mode()
    out = []
    for batch in batches:
        logits = model.logits(batch)
        labels = batch["labels"].to(model.device)
        out.append((float(F.cross_entropy(logits, labels, reduction="sum")), int((logits.argmax(-1) == labels).sum()),
                    len(batch["labels"])))
    return out


def combine_scores(scores: list[tuple[float, int, int]]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) from per-batch scores, summed in batch order."""
    loss_sum, correct, n = 0.0, 0, 0
    for loss, c, k in scores:
        loss_sum += loss
        correct += c
        n += k
    return loss_sum / n, correct / n


def evaluate(model: LocalModel, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the currently loaded model over pre-collated batches."""
    return combine_scores(batch_scores(model, batches))


@dataclass
class DeviceData:
    """What a device holds: token ids and labels (indexed by `positions`) and the pad id."""

    ids: list[np.ndarray]
    labels: np.ndarray
    positions: np.ndarray
    pad_id: int


@dataclass
class JobOutput:
    update: State  # device convention: trained layers + head
    train_loss: float
    flops: float  # FLOPs of the local steps, from the real token lengths (for the simulated clock)
    num_examples: int


def run_job(model: LocalModel, data: DeviceData, payload: State, plan: DevicePlan, *, seed: int, rnd: int,
            call: int, batch_size: int, lr: float, weight_decay: float, backward_ratio: float) -> JobOutput:
    """Everything a device does for one plan; the simulator and a Flower SuperNode both call this.

    Batches and the dropout seed derive from (seed, round, device, call), so the result does not
    depend on where or in which order devices run.
    """
    picks = job_picks(data.positions, plan, seed=seed, rnd=rnd, call=call, batch_size=batch_size)
    batches = make_batches(data.ids, data.labels, picks, data.pad_id)
    flops = sum(step_flops(model.cost, [len(data.ids[i]) for i in p], model.num_layers, len(plan.train_layers),
                           backward_ratio) for p in picks)
    update, loss = local_train(model, payload, plan, batches, lr, weight_decay,
                               torch_seed((seed, 5005, rnd, plan.device, call)))
    return JobOutput(update, loss, flops, len(data.positions))
