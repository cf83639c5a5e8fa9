"""The simulation loop (design.md §1.1, §3): config -> data & model -> fleet -> rounds -> metrics.

The engine owns the server state, the clock, the traffic meter, evaluation, checkpoints and the run
directory; the strategy owns everything method-specific and sees the engine only through
`RoundContext`. Every random choice is derived from (seed, round, device, ...), never from a running
generator, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hierfedlora import data as data_mod
from hierfedlora import instruct
from hierfedlora.clock import TrafficMeter, compute_time, transfer_time
from hierfedlora import privacy
from hierfedlora.config import ExperimentConfig, PrivacyConfig
from hierfedlora.device import instruct_eval
from hierfedlora.device.executor import LocalExecutor
from hierfedlora.device.instruct_eval import EvalSet
from hierfedlora.device.model import check_max_length, load_base, load_tokenizer, resolve_device
from hierfedlora.device.train import FleetData
from hierfedlora.errors import CheckpointError, ConfigError, DataError, PlanError
from hierfedlora.fast.joined import JoinedExecutor
from hierfedlora.fast.model import FastModel
from hierfedlora.fast.prefix_cache import PrefixCache
from hierfedlora.fast.workers import ProcessExecutor, WorkerSetup
from hierfedlora.fleet import DeviceProfile, availability, build_fleet, round_profiles
from hierfedlora.lora_state import State, from_device, num_bytes, to_device
from hierfedlora.partition import label_histograms, partition
from hierfedlora.protocol import (DeviceJob, DevicePlan, Exchange, Executor, Job, LocalDP, LocalTraining, Missed,
                                  Scores, SetupInfo, TrainResult)
from hierfedlora.strategies.registry import get_strategy, trainer_options

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("fingerprint", "round", "state", "strategy", "sim_time", "meter", "rows")  # "data" since later


@dataclasses.dataclass
class Workload:
    """Tokenised data, its splits and the device partition (design.md §4)."""

    label_names: list[str]
    ids: list[np.ndarray]  # all examples, variable length
    labels: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    parts: list[np.ndarray]  # per device: positions into ids/labels (subset of train)
    pad_id: int
    # instruction tuning (None for classification): prompt length of each example, the reference
    # responses, and the allowed answers' tokens where responses are classes (`instruct`)
    prompt_lens: np.ndarray | None = None
    responses: list[str] | None = None
    answers: list[list[int]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def fleet_data(self) -> FleetData:
        """Every device's data, as the executors read it."""
        return FleetData(self.ids, self.labels, self.parts, self.pad_id, self.prompt_lens)

    def fingerprint(self) -> str:
        """Hash of the tokens, labels, splits and partition: a checkpoint remembers it, so resuming
        notices a data file that changed under the same path (the config fingerprint cannot)."""
        h = hashlib.sha256()
        for a in (*self.ids, self.labels, self.train, self.val, self.test, *self.parts):
            h.update(np.ascontiguousarray(a).tobytes())
            h.update(b"|")
        h.update(json.dumps([self.label_names, self.responses]).encode())
        return h.hexdigest()[:16]


def build_workload(cfg: ExperimentConfig, tokenizer, embedding: torch.Tensor | None = None) -> Workload:
    """Tokens, splits and the device partition; for instruction tuning `embedding` is the frozen
    model's input embedding table (open responses are partitioned by prompt cluster, `instruct`)."""
    d, s = cfg.data, cfg.run.seed
    extra: dict[str, Any] = {}
    if cfg.task.kind == "instruction":
        ds = instruct.load_instructions(d.name, answers=cfg.task.answers, prompt_column=d.prompt_column,
                                        input_column=d.input_column, response_column=d.response_column,
                                        max_examples=d.max_examples, seed=s, split=d.split)
        ids, plens = instruct.encode(tokenizer, ds.prompts, ds.responses, cfg.model.max_length)
        labels, names = ds.labels, ds.label_names
        if ds.answers is None:
            labels = instruct.cluster_ids(ids, plens, embedding, cfg.task.clusters, s)
            names = [f"cluster{c}" for c in range(int(labels.max()) + 1)]
        extra = {"prompt_lens": plens, "responses": ds.responses,
                 "answers": instruct.encode_answers(tokenizer, ds.answers) if ds.answers is not None else None}
    else:
        data_mod.check_cache_dir(d.cache_dir)  # before reading: an unwritable cache fails first
        ds = data_mod.load_dataset(d.name, d.text_column, d.label_column, d.max_examples, seed=s, split=d.split)
        labels, names = ds.labels, ds.label_names
    train, val, test = data_mod.split_indices(labels, d.test_fraction, d.val_fraction, s)
    if d.max_test_examples is not None and len(test) > d.max_test_examples:
        keep, _, _ = data_mod.split_indices(labels[test], 1 - d.max_test_examples / len(test), 0.0, s)
        test = np.sort(test[keep])
    if cfg.task.kind != "instruction":
        ids = data_mod.tokenize(ds.texts, tokenizer, cfg.model.max_length, d.cache_dir, cache_key=f"{ds.name}:{cfg.model.name}")
    p = cfg.partition
    local = partition(labels[train], cfg.fleet.num_devices, p.kind, p.alpha, p.classes_per_device, p.min_partition_size, s)
    parts = [np.sort(train[idx]) for idx in local]
    empty = [i for i, q in enumerate(parts) if len(q) == 0]
    if empty:
        raise DataError(f"devices {empty} received no data; lower fleet.num_devices or use a milder partition.")
    return Workload(names, ids, labels, train, val, test, parts, tokenizer.pad_token_id, **extra)


def device_embeddings(w: Workload, embedding: torch.Tensor) -> np.ndarray:
    """[num_devices, hidden]: each device's mean over its examples of `data.mean_token_embeddings`
    (prompt tokens only for instruction data: the response is what the model learns to write)."""
    x = data_mod.mean_token_embeddings(w.ids, w.prompt_lens, embedding)
    return np.stack([x[p].mean(axis=0) for p in w.parts])


def _length_sorted_batches(w: Workload, positions: np.ndarray, batch_size: int) -> list[dict[str, torch.Tensor]]:
    order = sorted(positions.tolist(), key=lambda i: len(w.ids[i]))
    chunks = [np.array(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    if w.prompt_lens is not None:
        return [{**instruct.collate([w.ids[i] for i in c], w.prompt_lens[c], w.pad_id), "index": torch.as_tensor(c)}
                for c in chunks]
    return [{**data_mod.collate([w.ids[i] for i in chunk], w.labels[chunk], w.pad_id), "index": torch.as_tensor(chunk)}
            for chunk in chunks]


def _eval_set(w: Workload, positions: np.ndarray, tokenizer, cfg: ExperimentConfig) -> EvalSet:
    """What an instruction-tuning evaluation scores on these examples (`device.instruct_eval`)."""
    order = np.array(sorted(positions.tolist(), key=lambda i: len(w.ids[i])), dtype=np.int64)
    return EvalSet(batches=_length_sorted_batches(w, order, cfg.train.eval_batch_size),
                   prompts=[w.ids[i][:w.prompt_lens[i]] for i in order], references=[w.responses[i] for i in order],
                   labels=w.labels[order], answers=w.answers, tokenizer=tokenizer,
                   max_new_tokens=cfg.task.max_new_tokens, batch_size=cfg.train.eval_batch_size)


# method settings added after checkpoints were written: at these values a run computes what it did
# before they existed, so they are left out of the hash and such checkpoints still resume
_LATER_METHOD_DEFAULTS = {"grouping_input": "histograms", "sketch_dim": 16}


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """Hash of everything that determines results (not progress display or checkpoint cadence)."""
    d = cfg.to_dict()
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("progress", "checkpoint_every", "rounds", "eval_every", "target_acc",
                                                                      "budget_s")}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("prefix_cache", "cache_memory_mb", "workers", "lockstep")}  # speed only
    if d["run"].get("metric") == "accuracy":  # the default hashes as before the setting existed: old checkpoints resume
        del d["run"]["metric"]
    if not d["fleet"].get("secure_aggregation", True):  # likewise
        del d["fleet"]["secure_aggregation"]
    d.pop("tracking", None)  # where the run is mirrored to, not what it computes
    for key, default in _LATER_METHOD_DEFAULTS.items():  # method settings added later hash as before at their default
        if d["method"].get(key, default) == default:
            d["method"].pop(key, None)
    if d.get("privacy") == PrivacyConfig().model_dump(mode="json", exclude_none=True):
        del d["privacy"]  # dp off hashes as before the section existed: old checkpoints resume
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def local_training(cfg: ExperimentConfig) -> LocalTraining:
    """The settings every device job of this experiment trains with."""
    t, p = cfg.train, cfg.privacy
    local_dp = LocalDP(p.clip_norm, p.noise_multiplier) if p.dp == "local" else None
    return LocalTraining(seed=cfg.run.seed, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                         backward_ratio=cfg.fleet.backward_ratio, lockstep=t.lockstep, regularisers=trainer_options(),
                         local_dp=local_dp)


def check_central_dp(cfg: ExperimentConfig) -> None:
    """Refuse `privacy.dp = "central"` for a method that declares it cannot take it
    (`Strategy.no_central_dp`): its aggregate is not a uniform mean the noise σC/m protects."""
    entry = get_strategy(cfg.method.get("name", "fedlora"))
    why = entry.strategy.no_central_dp
    if cfg.privacy.dp == "central" and why is not None:
        raise ConfigError(f"privacy.dp = \"central\" cannot protect method.name = \"{entry.name}\": {why}. Use "
                          "privacy.dp = \"local\" (each device privatises its own update), or a method whose aggregate "
                          "is a uniform mean (fedlora, fedlora_topk, ffalora, hierfavg, hierfedlora).")


def local_executor(sim: "Simulation") -> Executor:
    """The executor that runs the simulation's jobs in this process on its model: with devices
    joined where their plans allow it (`train.lockstep` > 1), else one after another."""
    settings = local_training(sim.cfg)
    kind = JoinedExecutor if settings.lockstep > 1 else LocalExecutor
    return kind(sim.model, sim.work.fleet_data(), settings)


class Simulation:
    """One experiment: build everything from the config, then `run()`.

    The device model is the fast one (`fast.model.FastModel`: the plain `device.model.LocalModel`
    where the architecture or the device has no packed forward). Devices' local work goes through
    the executor that `executor(sim)` builds (default: in this process, or worker processes with
    `train.workers`); the Flower deployment passes one that sends the same jobs to SuperNodes.
    """

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None = None,
                 executor: Callable[["Simulation"], Executor] | None = None):
        self.cfg = cfg
        check_central_dp(cfg)  # before anything loads: a refused setting is reported in a second
        self.out = Path(out_dir) if out_dir else None
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed = cfg.run.seed
        self.tokenizer = load_tokenizer(cfg.model.name)
        self.instruction = cfg.task.kind == "instruction"
        if self.instruction:  # the causal LM first: open responses are clustered by its embeddings
            base = load_base(cfg.model.name, 0, self.tokenizer, seed, task="instruction")
            self.work = build_workload(cfg, self.tokenizer, base.get_input_embeddings().weight.detach())
        else:
            self.work = build_workload(cfg, self.tokenizer)
            base = load_base(cfg.model.name, self.work.num_classes, self.tokenizer, seed)
        check_max_length(base, cfg.model.name, cfg.model.max_length, cfg.task.max_new_tokens if self.instruction else 0)
        self.base_profiles = build_fleet(cfg.fleet.name, cfg.fleet.num_devices, seed)
        self.model = FastModel(base, cfg.model.target_modules, cfg.model.rank, cfg.model.alpha, cfg.model.lora_dropout,
                               seed, resolve_device(cfg.train.device))
        w = self.work
        self.setup = SetupInfo(
            layout=self.model.layout,
            profiles=self.base_profiles,
            num_examples=[len(p) for p in w.parts],
            label_hists=label_histograms(w.labels, w.parts, w.num_classes),
            mean_seq_len=[float(np.mean([len(w.ids[i]) for i in p])) for p in w.parts],
            cost=self.model.cost,
            rank=cfg.model.rank,
            alpha=cfg.model.alpha,
            local_steps=cfg.train.local_steps,
            batch_size=cfg.train.batch_size,
            bytes_per_param=cfg.fleet.bytes_per_param,
            backward_ratio=cfg.fleet.backward_ratio,
            aggregator=cfg.fleet.aggregator,
            seed=seed,
            mean_response_len=([float(np.mean([len(w.ids[i]) - w.prompt_lens[i] for i in p])) for p in w.parts]
                               if w.prompt_lens is not None else None),
            metric=cfg.run.metric,
            device_embeddings=functools.cache(lambda: device_embeddings(w, base.get_input_embeddings().weight.detach())),
        )
        entry = get_strategy(cfg.method.get("name", "fedlora"))
        self.method = entry.name
        self.strategy = entry.strategy(cfg.method_settings(), self.setup)
        self.global_ranks = dict(self.strategy.global_ranks())
        self.state: State = self.model.init_state(self.global_ranks)
        self.cached_layers = self._enable_prefix_cache()
        if self.instruction:
            self.test_batches = _eval_set(w, w.test, self.tokenizer, cfg)
            self.val_batches = _eval_set(w, w.val, self.tokenizer, cfg) if len(w.val) else []
            if cfg.run.metric == "macro_f1" and w.answers is None:
                raise ConfigError("run.metric = \"macro_f1\" needs class answers, but this data's responses are open "
                                  "text (scored by ROUGE-L); use run.metric = \"accuracy\" or task.answers = \"classes\".")
            self.score_key = "test_" + (self.test_batches.score if cfg.run.metric == "accuracy" else "macro_f1")
        else:
            self.test_batches = _length_sorted_batches(w, w.test, cfg.train.eval_batch_size)
            self.val_batches = _length_sorted_batches(w, w.val, cfg.train.eval_batch_size) if len(w.val) else []
            self.score_key = "test_acc" if cfg.run.metric == "accuracy" else "test_macro_f1"
        # counts of the latest test evaluation (rows true, columns predicted; None: open answers)
        self.test_confusion: tuple[tuple[int, ...], ...] | None = None
        self.meter = TrafficMeter()
        self.peak_memory: dict[int, float] = {}  # device -> largest estimated training peak (bytes)
        self.sim_time = 0.0
        self.round = 0
        self.rows: list[dict[str, Any]] = []
        self.dp_releases = [0] * cfg.fleet.num_devices  # per device: DP releases its updates took part in
        self.executor: Executor = executor(self) if executor else self._default_executor()

    def _default_executor(self) -> Executor:
        """In this process, or in worker processes (train.workers; see `fast.workers`)."""
        cfg = self.cfg
        n = cfg.train.workers or (os.cpu_count() or 1)
        if self.instruction:  # no packed decoder forward yet: nothing for workers or lockstep to join
            if cfg.train.workers != 1:
                warnings.warn("train.workers is not used for task.kind = \"instruction\": device jobs run in this "
                              "process (torch uses every core)")
            return LocalExecutor(self.model, self.work.fleet_data(), local_training(cfg))
        if n <= 1:
            return local_executor(self)
        if self.model.device.type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
            warnings.warn("train.workers > 1 needs a CPU run on a system that can fork; running jobs in this process.")
            return local_executor(self)
        setup = WorkerSetup(self.model, self.work.fleet_data(), local_training(cfg), cfg.train.cache_memory_mb)
        return ProcessExecutor(setup, n)

    def _enable_prefix_cache(self) -> int:
        """Cache layers below the strategy's lowest trainable layer; returns how many layers the
        cache serves (0 = no cache; see `fast.prefix_cache`)."""
        cfg, w = self.cfg, self.work
        lowest = self.strategy.lowest_trainable_layer()
        if not cfg.train.prefix_cache or lowest <= 0:
            return 0
        if self.instruction:
            return lowest if self.model.enable_decoder_prefix(lowest, cfg.train.cache_memory_mb) else 0
        rows = sum(len(w.ids[i]) for part in (w.train, w.val, w.test) for i in part)
        spill = self.out if self.out and self.out.is_dir() else None
        cache = PrefixCache(self.model.cost.hidden, rows, cfg.train.cache_memory_mb, spill)
        return lowest if self.model.enable_prefix_cache(lowest, cache) else 0

    # -- the RoundContext the strategy sees ------------------------------------------------
    def _train(self, ctx: "_RoundContext", jobs: list[Job]) -> Exchange:
        """Send each job to its device through the executor; book bytes and simulated time.

        One call is one exchange (design.md §3, "Dropouts and the deadline"): a device that drops
        out has received its model (its download is booked) and sends nothing, and the aggregator
        waits for it until `fleet.deadline_s`, or without one as long as its job would have taken;
        an update that would arrive after the deadline is a straggler's, booked and discarded. A
        device of `ctx.drops` drops out at its first exchange of the round and is gone for the
        rest of it (its aggregator saw it miss and sends it nothing more); a device the executor
        failed for is asked again at the next exchange, since a real node may come back.
        """
        bpp, rnd, profiles, deadline = self.cfg.fleet.bytes_per_param, ctx.rnd, ctx.profiles, self.cfg.fleet.deadline_s
        sent, missed = [], []
        for job in jobs:
            plan, d = job.plan, job.plan.device
            self._check_memory(plan, profiles[d])
            if d in ctx.drops and d in ctx.dropped:  # gone since an earlier exchange of this round
                continue
            payload = to_device(job.state, plan.ranks, self.global_ranks)
            b_down = num_bytes(payload, bpp, plan.downloaded(payload))
            if d in ctx.drops:
                missed.append(self._drop(ctx, plan, payload, b_down))
                continue
            k = ctx.calls.get(d, 0)
            ctx.calls[d] = k + 1
            sent.append((plan, payload, k, b_down, job.state, job.aggregator))
        device_jobs = [DeviceJob(plan, payload, k) for plan, payload, k, *_ in sent]
        sums = None
        if self.cfg.fleet.secure_aggregation:  # the aggregators get each group's sum, not the updates
            sent = self._skip_alone(ctx, sent, missed)
            device_jobs = [DeviceJob(plan, payload, k) for plan, payload, k, *_ in sent]
            aggregators = [a for *_, a in sent]
            _check_summable(sent)
            outputs, device_sums = self.executor.run_summed(rnd, device_jobs, aggregators)
            plan_of = {a: plan for plan, *_, a in sent}
            sums = {a: dataclasses.replace(s, mean=from_device(s.mean, plan_of[a].ranks, self.global_ranks))
                    for a, s in device_sums.items()}
        else:
            outputs = self.executor.run(rnd, device_jobs)
        results = []
        for (plan, payload, k, b_down, start, _), out in zip(sent, outputs):
            d = plan.device
            if out is None:  # the device failed while working on it
                missed.append(self._drop(ctx, plan, payload, b_down))
                continue
            if self.cfg.privacy.dp == "local":  # the device privatised it before upload: one release
                self.dp_releases[d] += 1
                if out.update_norm is not None:  # a Flower SuperNode does not report it
                    ctx.dp_norms.append(out.update_norm)
            # what it uploads: its update, or under secure aggregation the same tensors, masked
            b_up = num_bytes(out.update, bpp) if out.update is not None else num_bytes(payload, bpp, plan.uploaded(payload))
            up_bw, down_bw, lat = profiles[d].link(plan.link)
            self.meter.add(plan.link, up=b_up, down=b_down)
            update = None if out.update is None else from_device(out.update, plan.ranks, self.global_ranks)
            result = TrainResult(
                device=d, update=update, num_examples=out.num_examples,
                train_loss=out.train_loss, compute_s=compute_time(out.flops, profiles[d]),
                down_s=transfer_time(b_down, down_bw, lat), up_s=transfer_time(b_up, up_bw, lat),
                bytes_down=b_down, bytes_up=b_up)
            if deadline is not None and result.time_s > deadline:  # it still uploads; the aggregator discards it
                ctx.stragglers.add(d)
                missed.append(Missed(d, "straggler", deadline, b_down, b_up))
                continue
            if self.cfg.privacy.dp == "central":
                self._clip(ctx, result, start)
            results.append(result)
        if not results and any(m.reason == "straggler" for m in missed):
            warnings.warn(f"no update of an exchange arrived within fleet.deadline_s = {deadline:g} s: its aggregator "
                          "keeps its model and the exchange lasts the deadline; raise fleet.deadline_s if every "
                          "device should be able to make it", stacklevel=2)
        return Exchange(results, missed, sums)

    def _skip_alone(self, ctx: "_RoundContext", sent: list[tuple], missed: list[Missed]) -> list[tuple]:
        """Secure aggregation: an aggregator with a single device in an exchange cannot hide that
        device's update (the sum of one update is the update), so it does not ask it: the device
        gets no job (nothing moves, it waits for nothing: `Missed` "alone", 0 s) and its
        aggregator keeps its model for this exchange, as when every member dropped out."""
        count: dict[int, int] = {}
        for *_, a in sent:
            count[a] = count.get(a, 0) + 1
        kept = []
        for entry in sent:
            plan, a = entry[0], entry[-1]
            if count[a] > 1:
                kept.append(entry)
                continue
            ctx.calls[plan.device] -= 1  # it ran nothing: its next job's batches are those it would have had
            ctx.alone.add(plan.device)
            missed.append(Missed(plan.device, "alone", 0.0, 0))
        return kept

    def _clip(self, ctx: "_RoundContext", result: TrainResult, start: State) -> None:
        """Central DP, as the trusted aggregator receives an update: its change to the model the
        job started from clipped to C (server convention, all its tensors together), and weight 1,
        so the strategy's mean is the uniform mean of clipped updates whose noise `_release` adds
        (and the example counts stay with the aggregator)."""
        result.update, norm = privacy.clip_update(result.update, start, list(result.update), self.cfg.privacy.clip_norm)
        result.num_examples = 1
        ctx.dp_norms.append(norm)

    def _release(self, ctx: "_RoundContext", state: State, results: list[TrainResult]) -> State:
        """`RoundContext.release`: under central DP N(0, (σC/m)²) on every coordinate of the keys
        the m updates hold, from a generator seeded by (seed, round, release of the round), and one
        release counted for each of their devices; otherwise `state` as it is."""
        p = self.cfg.privacy
        if p.dp != "central" or not results:
            return state
        keys = [k for k in state if any(k in r.update for r in results)]
        gen = privacy.noise_generator((self.cfg.run.seed, 8008, ctx.rnd, ctx.releases))
        ctx.releases += 1
        for r in results:
            self.dp_releases[r.device] += 1
        return privacy.add_noise(state, keys, p.noise_multiplier * p.clip_norm / len(results), gen)

    def _dp_row(self, ctx: "_RoundContext") -> dict[str, Any]:
        """The privacy columns of a metrics row (dp on): ε at δ of the device that took part in the
        most releases so far (the worst case: ε grows with k), that k, and this round's mean norm
        of the updates before clipping with the fraction clipped (None when no update came)."""
        p = self.cfg.privacy
        k = max(self.dp_releases, default=0)
        norms = ctx.dp_norms
        return {"dp_epsilon": privacy.json_epsilon(privacy.epsilon(p.noise_multiplier, k, p.delta)), "dp_releases": k,
                "dp_update_norm": float(np.mean(norms)) if norms else None,
                "dp_clipped_fraction": float(np.mean([n > p.clip_norm for n in norms])) if norms else None}

    def _drop(self, ctx: "_RoundContext", plan: DevicePlan, payload: State, b_down: int) -> Missed:
        """A device that received its model and sent nothing: book its download; the aggregator
        waits the deadline, or without one the predicted job, t_down + C(E, |trained|) + t_up
        (`SetupInfo` predictions on this round's profile; upload = what it trains, `DevicePlan.uploaded`)."""
        d, profile, deadline = plan.device, ctx.profiles[plan.device], self.cfg.fleet.deadline_s
        ctx.dropped.add(d)
        self.meter.add(plan.link, down=b_down)
        if deadline is not None:
            return Missed(d, "dropped", deadline, b_down)
        b_up = num_bytes(payload, self.cfg.fleet.bytes_per_param, plan.uploaded(payload))
        wait = (self.setup.predict_transfer_s(d, b_down, b_up, plan.link, profile)
                + self.setup.predict_compute_s(d, len(plan.train_layers), plan.steps, profile))
        return Missed(d, "dropped", wait, b_down)

    def _check_memory(self, plan: DevicePlan, profile: DeviceProfile) -> None:
        """Refuse a plan whose estimated training memory exceeds the device's (`SetupInfo.
        predict_memory_bytes`); remember each device's largest estimate (`memory.json`)."""
        d = plan.device
        need = self.setup.predict_memory_bytes(d, plan.ranks, len(plan.train_layers))
        self.peak_memory[d] = max(self.peak_memory.get(d, 0.0), need)
        if need > profile.memory_gb * 1e9:
            raise PlanError(
                f"device {d} ({profile.kind}, {profile.memory_gb:g} GB) cannot train its plan: {len(plan.train_layers)} "
                f"trained layers need an estimated {need / 1e9:.2f} GB. Lower train.batch_size or model.max_length, "
                "or use a method that fits plans to devices (legend, hierfedlora).")

    def memory_report(self) -> dict[str, Any]:
        """Each device's memory and the largest estimated training peak of the plans it ran."""
        return {"estimate": "clock.train_memory_bytes", "devices": [
            {"device": d, "kind": p.kind, "memory_gb": p.memory_gb,
             "peak_estimate_gb": round(self.peak_memory[d] / 1e9, 4) if d in self.peak_memory else None}
            for d, p in enumerate(self.base_profiles)]}

    def _context(self, rnd: int) -> "_RoundContext":
        cfg = self.cfg
        profiles = round_profiles(self.base_profiles, rnd, cfg.run.seed, cfg.fleet.bandwidth_jitter)
        available, drops = availability(len(profiles), rnd, cfg.run.seed, cfg.fleet.participation, cfg.fleet.dropout)
        return _RoundContext(self, rnd, available, profiles, drops, np.random.default_rng([cfg.run.seed, 6006, rnd]))

    def evaluate(self, state: State, batches, ranks: dict[int, int] | None = None) -> Scores:
        r = ranks or self.global_ranks
        return self.executor.evaluate(to_device(state, r, self.global_ranks), r, batches)

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        assert self.out is not None
        blob = {
            "version": CHECKPOINT_VERSION, "fingerprint": config_fingerprint(self.cfg), "data": self.work.fingerprint(),
            "round": self.round,
            "state": self.state, "strategy": self.strategy.state_dict(), "sim_time": self.sim_time,
            "meter": self.meter.state_dict(), "rows": self.rows, "test_confusion": self.test_confusion,
        }
        if self.cfg.privacy.dp != "off":  # dp off writes what it wrote before the setting existed
            blob["dp_releases"] = list(self.dp_releases)
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def load_checkpoint(self, path: Path) -> None:
        try:
            blob = torch.load(path, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
            raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(e).__name__}: {e}); "
                                  "delete it to restart the run from scratch.") from None
        if not isinstance(blob, dict) or blob.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint '{path}' has an unknown format; delete it to restart the run.")
        missing = sorted(set(CHECKPOINT_KEYS) - set(blob))
        if missing:
            raise CheckpointError(f"checkpoint '{path}' lacks {', '.join(missing)} (damaged or not written by this "
                                  "version); delete it to restart the run from scratch.")
        if blob["fingerprint"] != config_fingerprint(self.cfg):
            raise CheckpointError(f"checkpoint '{path}' was written by a different configuration than "
                                  f"'{path.parent / 'config.toml'}'; restore that config or start a new run directory.")
        if "data" in blob and blob["data"] != self.work.fingerprint():
            raise CheckpointError(f"the data of data.name = {self.cfg.data.name!r} changed since checkpoint '{path}' was "
                                  "written (other tokens, labels or partition); restore the data the run started with, "
                                  "or start a new run directory.")
        if blob["round"] > self.cfg.run.rounds:
            raise CheckpointError(f"checkpoint '{path}' is at round {blob['round']}, past run.rounds = {self.cfg.run.rounds} "
                                  f"in '{path.parent / 'config.toml'}'; set run.rounds to at least {blob['round']} there.")
        keys = set(self.state)
        if set(blob["state"]) != keys or any(blob["state"][k].shape != self.state[k].shape for k in keys):
            raise CheckpointError(f"checkpoint '{path}' does not match this model's LoRA layout.")
        self.state, self.round, self.sim_time = blob["state"], blob["round"], blob["sim_time"]
        self.strategy.load_state_dict(blob["strategy"])
        self.meter.load_state_dict(blob["meter"])
        self.rows = blob["rows"]
        self.test_confusion = blob.get("test_confusion")  # older checkpoints: the next evaluation sets it
        if self.cfg.privacy.dp != "off":  # the fingerprint holds the privacy settings: dp on wrote the counts
            if len(blob.get("dp_releases", ())) != len(self.dp_releases):
                raise CheckpointError(f"checkpoint '{path}' lacks the DP release counts of its devices (damaged); "
                                      "delete it to restart the run from scratch.")
            self.dp_releases = [int(k) for k in blob["dp_releases"]]

    # -- the loop --------------------------------------------------------------------------
    def _eval_row(self) -> dict[str, float]:
        """The test metrics of the global model; keeps the pass's confusion counts (`confusion.json`)."""
        if self.instruction:  # every metric of the generative evaluation, on this process's model
            r = self.global_ranks
            self.model.load(to_device(self.state, r, r), r, ())
            m, confusion = instruct_eval.evaluate(self.model, self.test_batches)
            self.test_confusion = None if confusion is None else tuple(map(tuple, confusion.tolist()))
            return {f"test_{k}": v for k, v in m.items()}
        scores = self.evaluate(self.state, self.test_batches)
        self.test_confusion = scores.confusion
        return {"test_acc": scores.acc, "test_loss": scores.loss, "test_macro_f1": scores.macro_f1}

    def confusion_report(self) -> dict[str, Any] | None:
        """The latest test evaluation's confusion matrix with its class names (`confusion.json`);
        None where answers are open text."""
        if self.test_confusion is None:
            return None
        evals = [r for r in self.rows if "test_loss" in r]
        return {"round": evals[-1]["round"] if evals else None, "labels": list(self.work.label_names),
                "rows": "true class", "columns": "predicted class", "counts": [list(r) for r in self.test_confusion]}

    def step(self) -> dict[str, Any]:
        """One global round: the strategy runs it, the engine books time, traffic and metrics."""
        rnd = self.round + 1
        ctx = self._context(rnd)
        self.state, report = self.strategy.run_round(rnd, self.state, ctx)
        self.round = rnd
        self.sim_time += report.sim_time_s
        row: dict[str, Any] = {
            "round": rnd, "sim_time_s": self.sim_time, "round_time_s": report.sim_time_s,
            "bytes_up": self.meter.bytes_up, "bytes_down": self.meter.bytes_down,
            "bytes_wan": self.meter.up["wan"] + self.meter.down["wan"],
            "bytes_lan": self.meter.up["lan"] + self.meter.down["lan"],
            "train_loss": None if math.isnan(report.train_loss) else report.train_loss,
            "participants": len(report.participants), "participant_ids": report.participants,
            "dropped": sorted(ctx.dropped),
        }
        if self.cfg.fleet.deadline_s is not None:
            row["stragglers"] = sorted(ctx.stragglers)
        if self.cfg.fleet.secure_aggregation:
            row["secagg_alone"] = sorted(ctx.alone)
        if self.cfg.privacy.dp != "off":
            row.update(self._dp_row(ctx))
        if rnd % self.cfg.run.eval_every == 0 or self.done:  # the last round is always evaluated
            row.update(self._eval_row())
        row.update(report.extra)
        self.rows.append(row)
        return row

    @property
    def done(self) -> bool:
        """Whether the run is over: `run.rounds` reached, or the simulated clock at `run.budget_s`."""
        budget = self.cfg.run.budget_s
        return self.round >= self.cfg.run.rounds or (budget is not None and self.sim_time >= budget)

    def run(self, on_round=None) -> list[dict[str, Any]]:
        """Run until `done`, writing metrics and checkpoints when there is a run directory."""
        if self.round == 0 and not self.rows:
            self.rows.append({"round": 0, "sim_time_s": 0.0, "round_time_s": 0.0, "bytes_up": 0, "bytes_down": 0,
                              "bytes_wan": 0, "bytes_lan": 0, "participants": 0, **self._eval_row()})
        if self.out:
            _write_rows(self.out / "metrics.jsonl", self.rows)
        if on_round:
            on_round(self.rows[-1])
        while not self.done:
            row = self.step()
            if self.out:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if self.round % self.cfg.run.checkpoint_every == 0 or self.done:
                    self.save_checkpoint()
            if on_round:
                on_round(row)
        return self.rows

    def summary(self) -> dict[str, Any]:
        key = self.score_key
        evals = [r for r in self.rows if key in r]
        s: dict[str, Any] = {"method": self.method, "rounds": self.round}
        accs = [r for r in self.rows if "test_acc" in r]  # accuracy is reported whatever run.metric scores by
        if key == "test_acc" or accs:
            s["final_acc"] = accs[-1]["test_acc"] if accs else None
            s["best_acc"] = max(r["test_acc"] for r in accs) if accs else None
        if self.instruction or key != "test_acc":  # the chosen score by name (instruction: and zero-shot)
            s.update(score=key, final_score=evals[-1][key] if evals else None,
                     best_score=max(r[key] for r in evals) if evals else None)
        if self.instruction:
            s["zero_shot_score"] = self.rows[0].get(key) if self.rows else None
        s.update(sim_time_s=self.sim_time, bytes_up=self.meter.bytes_up, bytes_down=self.meter.bytes_down,
                 bytes_total=self.meter.bytes_up + self.meter.bytes_down)
        budget = self.cfg.run.budget_s
        if budget is not None:  # the score at the budget: the last evaluation at or before it
            at = [r for r in evals if r["sim_time_s"] <= budget]
            s.update(budget_s=budget, budget_reached=bool(self.sim_time >= budget),
                     score_at_budget=at[-1][key] if at else None, round_at_budget=at[-1]["round"] if at else None)
        target = self.cfg.run.target_acc
        if target is not None:
            s["target_acc"] = target
            hit = next((r for r in evals if r[key] >= target), None)
            s["time_to_target_s"] = hit["sim_time_s"] if hit else None
            s["bytes_to_target"] = (hit["bytes_up"] + hit["bytes_down"]) if hit else None
        p = self.cfg.privacy
        if p.dp != "off":  # ε of the worst device over the whole run (null: ∞, no noise)
            eps = privacy.epsilon(p.noise_multiplier, max(self.dp_releases, default=0), p.delta)
            s.update(dp_mode=p.dp, dp_epsilon=privacy.json_epsilon(eps), dp_delta=p.delta,
                     noise_multiplier=p.noise_multiplier, clip_norm=p.clip_norm, dp_releases=max(self.dp_releases))
        return s



@dataclasses.dataclass
class _RoundContext:
    """`protocol.RoundContext` of one global round of `sim`: who is available, this round's profiles
    and randomness; training, transfers and validation go through the simulation, which books them.
    `drops`: devices that drop out if asked to train; `calls`: jobs each device ran this round (its
    batches and seeds derive from it); `dropped`, `stragglers`: who dropped out, whose update came
    after the deadline (for the metrics row); `dp_norms`, `releases`: under DP, the round's update
    norms before clipping and its noised aggregates so far (the next one's noise seed)."""

    sim: Simulation
    rnd: int
    available: list[int]
    profiles: list[DeviceProfile]
    drops: set[int]
    rng: np.random.Generator
    calls: dict[int, int] = dataclasses.field(default_factory=dict)
    dropped: set[int] = dataclasses.field(default_factory=set)
    stragglers: set[int] = dataclasses.field(default_factory=set)
    alone: set[int] = dataclasses.field(default_factory=set)  # secure aggregation: the only device of its aggregator
    dp_norms: list[float] = dataclasses.field(default_factory=list)  # DP: update norms before clipping
    releases: int = 0  # central DP: noised aggregates released so far this round

    def train(self, jobs: list[Job]) -> Exchange:
        return self.sim._train(self, jobs)

    def release(self, state: State, results: list[TrainResult]) -> State:
        return self.sim._release(self, state, results)

    def transfer(self, nbytes_up: int, nbytes_down: int, link: str, profile: DeviceProfile) -> float:
        self.sim.meter.add(link, up=nbytes_up, down=nbytes_down)
        up, down, lat = profile.link(link)
        return transfer_time(nbytes_up, up, lat) + transfer_time(nbytes_down, down, lat)

    def validate(self, state: State, ranks: dict[int, int] | None = None) -> Scores:
        sim = self.sim
        return sim.evaluate(state, sim.val_batches or sim.test_batches, ranks)

def _check_summable(sent: list[tuple]) -> None:
    """A secure sum needs at least two devices per aggregator (one device's sum is its update) and
    one plan shape among them (every update the same tensors, so the sum is their FedAvg)."""
    by_agg: dict[int, list[DevicePlan]] = {}
    for plan, *_, a in sent:
        by_agg.setdefault(a, []).append(plan)
    for a, plans in by_agg.items():
        if len(plans) < 2:
            raise PlanError(f"fleet.secure_aggregation: aggregator {a} has a single device ({plans[0].device}) in this "
                            "exchange, and the sum of one update is that update. Raise fleet.participation, lower "
                            "fleet.dropout, or use fewer groups (method.num_groups).")
        shapes = {(tuple(sorted(p.ranks.items())), p.train_layers, p.frozen_factors) for p in plans}
        if len(shapes) > 1:
            raise PlanError(f"fleet.secure_aggregation: the devices of aggregator {a} were planned different ranks or "
                            "layers; a secure sum adds identically shaped updates only.")


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
