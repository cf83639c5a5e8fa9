"""Joined devices: several devices' batches trained as one, one forward and one backward per
step (`train.lockstep` = the most devices joined), each device with its own LoRA factors, head,
optimiser and dropout stream, so each gets bit for bit what it gets alone (tests/fast/test_joined.py).

Rows and attention do not depend on their batch-mates (`packed` module docstring), and each
device's LoRA products keep the shapes they have alone; so joining changes no number, while every
frozen product, layer norm, activation and attention bucket runs once for all the devices. A
joined batch is a `Joined`: a `packed.Pack` of all the rows whose per-device hooks (dropout masks,
LoRA branch) do each device's part with its own factors and generator. Only jobs of one plan shape
join (`joinable`); `run_jobs` cuts a list of jobs into groups (`joined_groups`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hierfedlora.device.executor import LocalExecutor
from hierfedlora.device.model import put_factors, state_of
from hierfedlora.device.train import DeviceData, job_inputs, privatise, run_job
from hierfedlora.fast import masks
from hierfedlora.fast.model import FastModel
from hierfedlora.fast.packed import (MIN_ROWS, Bucket, Pack, PackedEncoder, dropout, gather_index, lora_branch,
                                     make_pack, zero_factors)
from hierfedlora.lora_state import State, parse_head_key
from hierfedlora.protocol import DeviceJob, DevicePlan, JobOutput, LocalTraining

# where PEFT keeps the trainable copy of a head module's parameters, inside that module
_SAVED = "modules_to_save.default."


@dataclass
class DeviceFactors:
    """One device's LoRA factors (A, B by LoRA module) and head parameters (names as inside the
    classifier module), in tensors of its own, for a joined batch."""

    lora: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]
    head: dict[str, torch.Tensor]

    def parameters(self) -> list[torch.Tensor]:
        return [t for ab in self.lora.values() for t in ab] + list(self.head.values())


@dataclass
class Joined(Pack):
    """Several devices' batches as one `Pack` (see `join`): `parts` are their own packs, in order,
    `factors` their LoRA factors and heads, `rng` their dropout generator states (updated as they
    draw), `sources` the (part, its bucket) behind each of the joined buckets."""

    parts: list[Pack]
    factors: list[DeviceFactors]
    rng: list[torch.Tensor]
    sources: list[list[tuple[int, int]]]

    def drawing(self, k: int, draw):
        """draw() with the default CPU generator in part k's state, which it then keeps: each
        device draws its masks from its own stream, in the order it would alone."""
        torch.set_rng_state(self.rng[k])
        try:
            return draw()
        finally:
            self.rng[k] = torch.get_rng_state()

    def noise(self, first: bool, h: int, keep: float, dev: torch.device) -> torch.Tensor:
        return torch.cat([self.drawing(k, lambda: p.noise(first, h, keep, dev)) for k, p in enumerate(self.parts)])

    def attention_noise(self, heads: int, p: float, first_only: bool, dev: torch.device) -> list[torch.Tensor]:
        """Each device's blocks from its own stream, laid side by side in the joined buckets."""
        drawn = [self.drawing(k, lambda: part.attention_noise(heads, p, first_only, dev)) for k, part in enumerate(self.parts)]
        return [torch.cat([drawn[k][j] for k, j in src]) if len(src) > 1 else drawn[src[0][0]][src[0][1]]
                for src in self.sources]

    def lora_linear(self, mod: nn.Module, x: torch.Tensor, first: bool) -> torch.Tensor:
        """The frozen product once for all rows (each part has at least MIN_ROWS: `joinable`), each
        device's LoRA branch on its own rows, in one autograd node. Built in the order
        `Pack.lora_linear` builds its nodes: the backward then adds up the gradients reaching x in
        the same order, hence to the same bits."""
        factors = [f.lora[mod] for f in self.factors]
        scale = mod.scaling.get("default", 1.0)
        if scale == 0.0 or all(zero_factors(a, b) for a, b in factors):
            return mod.base_layer(x)
        sizes = [p.batch if first else len(p.noise_rows) for p in self.parts]
        lora = lora_branch(dropout(x, mod.lora_dropout["default"], self, first), scale, sizes, factors)
        return mod.base_layer(x) + lora


def join(packs: list[Pack], factors: list[DeviceFactors], rng: list[torch.Tensor]) -> Joined:
    """Several devices' batches as one: their packed rows end to end (device by device), so every
    frozen product, layer norm and activation runs once for all of them, and attention runs one
    product per width for all of them, while each device keeps its own LoRA factors, head and
    dropout stream (`rng`: generator states, updated as they draw)."""
    rows = np.cumsum([0] + [len(p.noise_rows) for p in packs])
    ex = np.cumsum([0] + [p.batch for p in packs])
    pieces: dict[int, list] = {}  # width -> (part, its bucket, bucket, slots) of every part
    for k, p in enumerate(packs):
        slots = p.slots.split([len(bk.members) * bk.width for bk in p.buckets])
        for j, (bk, sl) in enumerate(zip(p.buckets, slots)):
            pieces.setdefault(bk.width, []).append((k, j, bk, sl + int(rows[k])))
    buckets, slots, sources = [], [], []
    for width in sorted(pieces):
        ps = pieces[width]
        buckets.append(Bucket(width, torch.cat([bk.members + int(ex[k]) for k, _, bk, _ in ps]),
                              [n for _, _, bk, _ in ps for n in bk.lengths], torch.cat([bk.key_mask for _, _, bk, _ in ps])))
        slots += [sl for _, _, _, sl in ps]
        sources.append([(k, j) for k, j, _, _ in ps])
    order = torch.cat([bk.members for bk in buckets])
    unorder = torch.empty_like(order)
    unorder[order] = torch.arange(len(order))
    firsts = torch.cat([p.firsts + int(r) for p, r in zip(packs, rows)])
    groups = [(n, a + int(r), b + int(r), m + int(e)) for p, r, e in zip(packs, rows, ex) for n, a, b, m in p.groups]
    cat = torch.cat
    return Joined(int(ex[-1]), max(p.width for p in packs), cat([p.rows for p in packs]), cat([p.noise_rows for p in packs]),
                  firsts, unorder, order, groups, buckets, cat(slots), gather_index(buckets, firsts.numpy()),
                  list(packs), list(factors), rng, sources)


def joined_head(encoder: PackedEncoder, first: torch.Tensor, pack: Joined) -> torch.Tensor:
    """Logits of a joined batch from the first tokens' final hidden states: each device's with its
    own head parameters and dropout stream."""
    cls = encoder.model.classifier
    out, start = [], 0
    for k, (p, f) in enumerate(zip(pack.parts, pack.factors)):
        rows = first[start:start + p.batch]
        out.append(pack.drawing(k, lambda: encoder.classify(rows, lambda h: torch.func.functional_call(cls, f.head, (h,)))))
        start += p.batch
    return torch.cat(out)


# -- the model, for several devices at once ---------------------------------------------------
def can_join(model: FastModel) -> bool:
    """Whether devices can be joined on this model (`joined_logits`): the packed forward with the
    masks that need no generator of their own, and a head named `classifier`."""
    return (model.packed is not None and masks.available()
            and all(parse_head_key(k)[0] == "classifier" for k in model.head))


def device_factors(model: FastModel, payload: State, ranks: dict[int, int], trained: set[int],
                   frozen_factors: Collection[str] = ()) -> DeviceFactors:
    """A device's LoRA factors and head as `load` sets them, in tensors of their own that train
    where `load` would train them (not the factors in `frozen_factors`)."""
    lora = {}
    with torch.no_grad():
        for (layer, sub), mod in model.lora.items():
            ab = torch.empty_like(mod.lora_A["default"].weight), torch.empty_like(mod.lora_B["default"].weight)
            put_factors(*ab, payload, layer, sub, ranks.get(layer, 0), layer in trained, frozen_factors)
            lora[mod] = ab
        head = {_SAVED + parse_head_key(k)[1]: payload[k].to(model.device, copy=True).requires_grad_(True)
                for k in model.head}
    return DeviceFactors(lora, head)


def load_joined(model: FastModel, payloads: list[State], ranks: dict[int, int],
                train_layers: tuple[int, ...] | list[int], frozen_factors: Collection[str] = ()) -> list[DeviceFactors]:
    """Take on several devices' payloads of one plan: the scales and modes of `load`, each
    device's factors and head in `DeviceFactors`; the prefix cache serves them only if it may
    serve every one of them."""
    model.load(payloads[0], ranks, train_layers, frozen_factors=frozen_factors)
    for p in payloads[1:]:
        model.also_serve(p, ranks, train_layers)
    trained = set(train_layers)
    return [device_factors(model, p, ranks, trained, frozen_factors) for p in payloads]


def extract_joined(model: FastModel, factors: DeviceFactors, layers: list[int] | tuple[int, ...],
                   ranks: dict[int, int], frozen_factors: Collection[str] = ()) -> State:
    """`LocalModel.extract` for a device of a joined batch: its own factors (but `frozen_factors`) and head."""
    return state_of({k: factors.lora[mod] for k, mod in model.lora.items()},
                    {k: factors.head[_SAVED + parse_head_key(k)[1]] for k in model.head}, layers, ranks,
                    frozen=frozen_factors)


def joined_logits(model: FastModel, batches: list[dict[str, torch.Tensor]], factors: list[DeviceFactors],
                  rng: list[torch.Tensor]) -> torch.Tensor:
    """Class logits of several devices' batches (end to end) in one forward, device k with
    factors[k] and its dropout generator state rng[k] (updated): what `FastModel.logits` gives
    each alone."""
    enc, dev = model.packed, model.device
    packs = [make_pack(b["attention_mask"], model.dropout_width) for b in batches]
    pack = join(packs, factors, rng)
    if all(model.uses_cache(b) for b in batches):
        x = torch.cat([model.cached_rows(b, p) for b, p in zip(batches, packs)])
        return joined_head(enc, enc.encode(x, pack, model.cached_layers), pack)
    x = torch.cat([pack.drawing(k, lambda: enc.embed(b["input_ids"].to(dev), p))
                   for k, (b, p) in enumerate(zip(batches, packs))])
    return joined_head(enc, enc.encode(x, pack), pack)


# -- training joined devices ------------------------------------------------------------------
def local_train_joined(model: FastModel, items: list[tuple[State, DevicePlan, list[dict[str, torch.Tensor]], int]],
                       settings: LocalTraining) -> list[tuple[State, float]]:
    """`device.train.local_train` for several devices of the same plan shape at once, each item
    (payload, plan, batches, seed): one forward and one backward per step for all of them
    (`joined_logits`), each device with its own factors, head, optimiser and dropout stream, so
    each gets exactly what `local_train` gives it alone."""
    plan = items[0][1]
    factors = load_joined(model, [payload for payload, _, _, _ in items], plan.ranks, plan.train_layers, plan.frozen_factors)
    model.train_mode(min(plan.train_layers) if plan.train_layers else model.num_layers)
    opts = [torch.optim.AdamW([t for t in f.parameters() if t.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay)
            for f in factors]
    model.prepare([b for _, _, batches, _ in items for b in batches])
    rng = []
    for _, _, _, seed in items:
        torch.manual_seed(seed)
        rng.append(torch.get_rng_state())
    totals = [0.0] * len(items)
    for step in range(len(items[0][2])):
        batches = [batches[step] for _, _, batches, _ in items]
        logits = joined_logits(model, batches, factors, rng)
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
    return [(extract_joined(model, f, plan.train_layers, plan.ranks, plan.frozen_factors), t / max(1, len(items[0][2])))
            for f, t in zip(factors, totals)]


def joinable(model: FastModel, plans: list[DevicePlan], sizes: list[int], batch_size: int) -> bool:
    """Whether these jobs can be joined (`local_train_joined`): the same layers, ranks, frozen
    factors and steps, no method-specific options, and batches no smaller than the products' MIN_ROWS (`sizes`: each
    device's examples), so every product has the shape it has alone."""
    p = plans[0]
    same = all(q.ranks == p.ranks and q.train_layers == p.train_layers and q.frozen_factors == p.frozen_factors
               and q.steps == p.steps and not q.options for q in plans)
    return same and can_join(model) and min(min(batch_size, n) for n in sizes) >= MIN_ROWS


def joined_groups(model: FastModel, plans: list[DevicePlan], sizes: list[int], batch_size: int,
                  lockstep: int) -> list[list[int]]:
    """Consecutive jobs that are joined (indices into `plans`): each run of jobs that can be, cut
    into the fewest groups of at most `lockstep`, as even as possible (10 jobs and lockstep 8: 5
    and 5, not 8 and 2)."""
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


def run_jobs(model: FastModel, jobs: list[tuple[DeviceData, DeviceJob]], rnd: int, settings: LocalTraining) -> list[JobOutput]:
    """`run_job` for each (data, job), up to `settings.lockstep` devices at a time joined where
    their plans allow it (`joined_groups`): the same outputs, fewer operations."""
    groups = joined_groups(model, [j.plan for _, j in jobs], [len(d.positions) for d, _ in jobs], settings.batch_size,
                           settings.lockstep)
    out: list[JobOutput | None] = [None] * len(jobs)
    for g in groups:
        if len(g) == 1:
            out[g[0]] = run_job(model, *jobs[g[0]], rnd, settings)
            continue
        items, flops = [], []
        for i in g:
            data, job = jobs[i]
            batches, job_seed, f = job_inputs(model, data, job, rnd, settings)
            items.append((job.payload, job.plan, batches, job_seed))
            flops.append(f)
        for i, (update, loss), f in zip(g, local_train_joined(model, items, settings), flops):
            update, norm = privatise(update, jobs[i][1], rnd, settings)  # each device's own, as alone
            out[i] = JobOutput(update, loss, f, len(jobs[i][0].positions), norm)
    return out


class JoinedExecutor(LocalExecutor):
    """`LocalExecutor` with consecutive jobs of one plan shape joined (`run_jobs`)."""

    model: FastModel

    def run(self, rnd: int, jobs: list[DeviceJob]) -> list[JobOutput | None]:
        return run_jobs(self.model, [(self.data.device(j.plan.device), j) for j in jobs], rnd, self.settings)

    def groups(self, jobs: list[DeviceJob]) -> list[list[int]]:
        """The jobs `run` joins (indices)."""
        return joined_groups(self.model, [j.plan for j in jobs], [len(self.data.parts[j.plan.device]) for j in jobs],
                             self.settings.batch_size, self.settings.lockstep)
