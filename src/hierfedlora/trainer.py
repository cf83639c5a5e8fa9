"""Local training on one device (design.md §2.3): LoRA of the planned layers + head, layers below frozen.

Pure in what matters: the result depends only on the payload, the plan, the batches and the seed,
so the simulator, a resumed run and a Flower SuperNode all compute the same update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hierfedlora import packed
from hierfedlora.clock import step_flops
from hierfedlora.data import collate
from hierfedlora.lora_state import State
from hierfedlora.models import LocalModel
from hierfedlora.protocol import DeviceJob, DevicePlan, JobOutput, LocalTraining


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
                settings: LocalTraining, seed: int) -> tuple[State, float]:
    """Train the plan's layers for len(batches) steps with AdamW; returns (update in device
    convention: trained layers + head, mean training loss). `seed` seeds dropout."""
    model.load(payload, plan.ranks, plan.train_layers)
    lowest = min(plan.train_layers) if plan.train_layers else model.num_layers
    model.train_mode(lowest)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.warm_prefix(batches)
    torch.manual_seed(seed)
    total = 0.0
    for batch in batches:
        loss = F.cross_entropy(model.logits(batch), batch["labels"].to(model.device))
        total += float(loss.detach())
        for name, value in plan.options.items():
            if name in settings.regularisers:
                loss = loss + settings.regularisers[name](model, plan, value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.extract(plan.train_layers, plan.ranks), total / max(1, len(batches))


def local_train_joined(model: LocalModel, items: list[tuple[State, DevicePlan, list[dict[str, torch.Tensor]], int]],
                       settings: LocalTraining) -> list[tuple[State, float]]:
    """`local_train` for several devices of the same plan shape at once, each item (payload, plan,
    batches, seed): one forward and one backward per step for all of them (`LocalModel.logits_joined`),
    each device with its own factors, head, optimiser and dropout stream, so each gets exactly what
    `local_train` gives it alone (tests/test_speed.py checks bit for bit)."""
    plan = items[0][1]
    adapters = model.load_joined([payload for payload, _, _, _ in items], plan.ranks, plan.train_layers)
    model.train_mode(min(plan.train_layers) if plan.train_layers else model.num_layers)
    opts = [torch.optim.AdamW([t for t in ad.parameters() if t.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay)
            for ad in adapters]
    model.warm_prefix([b for _, _, batches, _ in items for b in batches])
    rng = []
    for _, _, _, seed in items:
        torch.manual_seed(seed)
        rng.append(torch.get_rng_state())
    totals = [0.0] * len(items)
    for step in range(len(items[0][2])):
        batches = [batches[step] for _, _, batches, _ in items]
        logits = model.logits_joined(batches, adapters, rng)
        loss, start = None, 0
        for k, b in enumerate(batches):
            n = len(b["labels"])
            lk = F.cross_entropy(logits[start:start + n], b["labels"].to(model.device))
            totals[k] += float(lk.detach())
            loss = lk if loss is None else loss + lk
            start += n
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
    return [(model.extract(plan.train_layers, plan.ranks, adapter=ad), t / max(1, len(items[0][2])))
            for ad, t in zip(adapters, totals)]


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


def joinable(model: LocalModel, plans: list[DevicePlan], sizes: list[int], batch_size: int) -> bool:
    """Whether these jobs can train together (`local_train_joined`): the same layers, ranks and
    steps, no method-specific options, and batches no smaller than the products' MIN_ROWS
    (`sizes`: each device's examples), so every product has the shape it has alone."""
    p = plans[0]
    same = all(q.ranks == p.ranks and q.train_layers == p.train_layers and q.steps == p.steps and not q.options
               for q in plans)
    return same and model.joinable() and min(min(batch_size, n) for n in sizes) >= packed.MIN_ROWS


def lockstep_groups(model: LocalModel, plans: list[DevicePlan], sizes: list[int], batch_size: int,
                    lockstep: int) -> list[list[int]]:
    """Consecutive jobs that train together (indices into `plans`): each run of jobs that can,
    cut into the fewest groups of at most `lockstep`, as even as possible (10 jobs and lockstep 8:
    5 and 5, not 8 and 2)."""
    runs: list[list[int]] = []
    for i, plan in enumerate(plans):
        r = runs[-1] if runs else None
        if r and joinable(model, [plans[r[0]], plan], [sizes[r[0]], sizes[i]], batch_size):
            r.append(i)
        else:
            runs.append([i])
    groups = []
    for r in runs:
        m = -(-len(r) // lockstep)
        cuts = [len(r) * j // m for j in range(m + 1)]
        groups += [r[a:b] for a, b in zip(cuts, cuts[1:])]
    return groups


def run_jobs(model: LocalModel, jobs: list[tuple[DeviceData, DeviceJob]], rnd: int, settings: LocalTraining) -> list[JobOutput]:
    """`run_job` for each (data, job), up to `settings.lockstep` devices at a time trained
    together where their plans allow it (`lockstep_groups`): the same outputs, fewer operations."""
    groups = lockstep_groups(model, [j.plan for _, j in jobs], [len(d.positions) for d, _ in jobs], settings.batch_size,
                             settings.lockstep)
    out: list[JobOutput | None] = [None] * len(jobs)
    for g in groups:
        if len(g) == 1:
            out[g[0]] = run_job(model, *jobs[g[0]], rnd, settings)
            continue
        items, flops = [], []
        for i in g:
            data, job = jobs[i]
            batches, job_seed, f = _job_inputs(model, data, job, rnd, settings)
            items.append((job.payload, job.plan, batches, job_seed))
            flops.append(f)
        for i, (update, loss), f in zip(g, local_train_joined(model, items, settings), flops):
            out[i] = JobOutput(update, loss, f, len(jobs[i][0].positions))
    return out


def _job_inputs(model: LocalModel, data: DeviceData, job: DeviceJob, rnd: int,
                settings: LocalTraining) -> tuple[list[dict[str, torch.Tensor]], int, float]:
    """A job's batches, dropout seed and FLOPs (for the simulated clock), from (seed, round, device, call)."""
    plan, seed = job.plan, settings.seed
    picks = job_picks(data.positions, plan, seed=seed, rnd=rnd, call=job.call, batch_size=settings.batch_size)
    flops = sum(step_flops(model.cost, [len(data.ids[i]) for i in p], model.num_layers, len(plan.train_layers),
                           settings.backward_ratio) for p in picks)
    return (make_batches(data.ids, data.labels, picks, data.pad_id), torch_seed((seed, 5005, rnd, plan.device, job.call)),
            flops)


def run_job(model: LocalModel, data: DeviceData, job: DeviceJob, rnd: int, settings: LocalTraining) -> JobOutput:
    """Everything a device does for one job; the simulator and a Flower SuperNode both call this.

    Batches and the dropout seed derive from (seed, round, device, call), so the result does not
    depend on where or in which order devices run.
    """
    batches, job_seed, flops = _job_inputs(model, data, job, rnd, settings)
    update, loss = local_train(model, job.payload, job.plan, batches, settings, job_seed)
    return JobOutput(update, loss, flops, len(data.positions))
