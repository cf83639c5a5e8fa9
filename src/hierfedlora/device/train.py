"""Local training on one device (design.md §2.3): LoRA of the planned layers (but the factors the plan
freezes) + head, layers below frozen.

Pure in what matters: the result depends only on the payload, the plan, the batches and the seed,
so the simulator, a resumed run and a Flower SuperNode all compute the same update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hierfedlora import instruct, privacy
from hierfedlora.clock import step_flops
from hierfedlora.data import collate
from hierfedlora.device import instruct_eval
from hierfedlora.device.model import LocalModel
from hierfedlora.lora_state import State
from hierfedlora.metrics import confusion_counts
from hierfedlora.protocol import DeviceJob, DevicePlan, JobOutput, LocalTraining, Scores


@dataclass
class DeviceData:
    """What a device holds: token ids and labels (indexed by `positions`) and the pad id; for
    instruction tuning also each example's prompt length (the loss counts the tokens after it)."""

    ids: list[np.ndarray]
    labels: np.ndarray
    positions: np.ndarray
    pad_id: int
    prompt_lens: np.ndarray | None = None


@dataclass(frozen=True)
class FleetData:
    """Every device's data as executors see it: the token ids and labels of all examples, each
    device's positions into them (`parts`) and the pad id."""

    ids: list[np.ndarray]
    labels: np.ndarray
    parts: list[np.ndarray]
    pad_id: int
    prompt_lens: np.ndarray | None = None

    def device(self, d: int) -> DeviceData:
        return DeviceData(self.ids, self.labels, self.parts[d], self.pad_id, self.prompt_lens)


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


def make_batches(ids: list[np.ndarray], labels: np.ndarray, picks: list[np.ndarray], pad_id: int,
                 prompt_lens: np.ndarray | None = None) -> list[dict[str, torch.Tensor]]:
    """Padded batches; `index` names each example (its position in `ids`) for the prefix cache.
    With `prompt_lens` (instruction tuning) `labels` are the response tokens (`instruct.collate`)."""
    if prompt_lens is not None:
        return [{**instruct.collate([ids[i] for i in p], prompt_lens[p], pad_id), "index": torch.as_tensor(p)}
                for p in picks]
    return [{**collate([ids[i] for i in p], labels[p], pad_id), "index": torch.as_tensor(p)} for p in picks]


def local_train(model: LocalModel, payload: State, plan: DevicePlan, batches: list[dict[str, torch.Tensor]],
                settings: LocalTraining, seed: int) -> tuple[State, float]:
    """Train the plan's layers for len(batches) steps with AdamW; returns (update in device
    convention: trained layers but `plan.frozen_factors`, + head; mean training loss). `seed`
    seeds dropout."""
    model.load(payload, plan.ranks, plan.train_layers, frozen_factors=plan.frozen_factors)
    lowest = min(plan.train_layers) if plan.train_layers else model.num_layers
    model.train_mode(lowest)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.prepare(batches)
    torch.manual_seed(seed)
    total = 0.0
    for batch in batches:
        loss = model.loss(batch)
        total += float(loss.detach())
        for name, value in plan.options.items():
            if name in settings.regularisers:
                loss = loss + settings.regularisers[name](model, plan, value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.extract(plan.train_layers, plan.ranks, frozen_factors=plan.frozen_factors), total / max(1, len(batches))


def job_inputs(model: LocalModel, data: DeviceData, job: DeviceJob, rnd: int,
               settings: LocalTraining) -> tuple[list[dict[str, torch.Tensor]], int, float]:
    """A job's batches, dropout seed and FLOPs (for the simulated clock), from (seed, round, device, call)."""
    plan, seed = job.plan, settings.seed
    picks = job_picks(data.positions, plan, seed=seed, rnd=rnd, call=job.call, batch_size=settings.batch_size)
    flops = sum(step_flops(model.cost, [len(data.ids[i]) for i in p], model.num_layers, len(plan.train_layers),
                           settings.backward_ratio, response_tokens(data, p)) for p in picks)
    return (make_batches(data.ids, data.labels, picks, data.pad_id, data.prompt_lens),
            torch_seed((seed, 5005, rnd, plan.device, job.call)), flops)


def response_tokens(data: DeviceData, positions: np.ndarray) -> int:
    """Positions where a causal LM's loss is computed for these examples (0 for classification)."""
    if data.prompt_lens is None:
        return 0
    return int(sum(len(data.ids[i]) - data.prompt_lens[i] for i in positions))


def run_job(model: LocalModel, data: DeviceData, job: DeviceJob, rnd: int, settings: LocalTraining) -> JobOutput:
    """Everything a device does for one job; the simulator and a Flower SuperNode both call this.

    Batches and the dropout seed derive from (seed, round, device, call), so the result does not
    depend on where or in which order devices run.
    """
    batches, job_seed, flops = job_inputs(model, data, job, rnd, settings)
    update, loss = local_train(model, job.payload, job.plan, batches, settings, job_seed)
    update, norm = privatise(update, job, rnd, settings)
    return JobOutput(update, loss, flops, len(data.positions), norm)


def privatise(update: State, job: DeviceJob, rnd: int, settings: LocalTraining) -> tuple[State, float | None]:
    """The update as the device uploads it, and ‖Δ‖₂ before clipping (None without local DP).

    Local DP (`settings.local_dp`, `privacy`): Δ = update − payload over the uploaded keys
    (`DevicePlan.uploaded`, device convention) clipped to C, then N(0, (σC)²) per coordinate, from
    a generator seeded by (seed, round, device, call) like the batches, so every executor (joined,
    workers, a Flower SuperNode) and a resumed run upload the same numbers."""
    dp = settings.local_dp
    if dp is None:
        return update, None
    keys = job.plan.uploaded(job.payload)
    if set(keys) != set(update):
        raise ValueError(f"device {job.plan.device}: update holds {sorted(set(update) ^ set(keys))} against its plan")
    clipped, norm = privacy.clip_update(update, job.payload, keys, dp.clip_norm)
    gen = privacy.noise_generator((settings.seed, 7007, rnd, job.plan.device, job.call))
    return privacy.add_noise(clipped, keys, dp.noise_multiplier * dp.clip_norm, gen), norm


@torch.no_grad()
def batch_scores(model: LocalModel, batches: list[dict[str, torch.Tensor]]) -> list[tuple[float, np.ndarray]]:
    """(summed cross-entropy, confusion counts [classes, classes]) of the currently loaded model, per batch."""
    model.eval_mode()
    out = []
    for batch in batches:
        logits = model.logits(batch)
        labels = batch["labels"].to(model.device)
        out.append((float(F.cross_entropy(logits, labels, reduction="sum")),
                    confusion_counts(labels.cpu().numpy(), logits.argmax(-1).cpu().numpy(), logits.shape[-1])))
    return out


def combine_scores(scores: list[tuple[float, np.ndarray]]) -> Scores:
    """Mean cross-entropy, accuracy and macro-F1 from per-batch scores, summed in batch order."""
    loss_sum, confusion = 0.0, 0
    for loss, c in scores:
        loss_sum += loss
        confusion = confusion + c  # integer counts: the order of batches cannot change them
    return Scores.of_classes(loss_sum / int(confusion.sum()), confusion)


def evaluate(model: LocalModel, batches: "list[dict[str, torch.Tensor]] | instruct_eval.EvalSet") -> Scores:
    """Loss, accuracy, macro-F1 and confusion counts of the currently loaded model over
    pre-collated batches; for an instruction `EvalSet` the mean response-token cross-entropy, its
    chosen score as `acc`, and for class answers their macro-F1 and confusion counts."""
    if isinstance(batches, instruct_eval.EvalSet):
        m, confusion = instruct_eval.evaluate(model, batches)
        if confusion is None:
            return Scores(m["loss"], m[batches.score])
        return Scores(m["loss"], m[batches.score], m["macro_f1"], tuple(map(tuple, confusion.tolist())))
    return combine_scores(batch_scores(model, batches))
