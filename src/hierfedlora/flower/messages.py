"""What crosses the wire between the ServerApp and a device's ClientApp, as typed Flower records.

One module owns the wire format so the server side (`executor`) and the device side (`client_app`)
cannot drift apart. A training message carries

- ``"payload"`` (ArrayRecord): the LoRA tensors of the device's plan, device convention
  (`lora_state.to_device`); with ``download="trained"`` only what it trains (`DevicePlan.uploaded`),
  the device takes the frozen layers and factors from the copy it kept (``base-tag`` names that copy);
- ``"plan"`` (ConfigRecord): device, round, call index, steps, ranks, trained layers, frozen
  LoRA factors, link, download, method extras, and the tags of the held copy;
- ``"train"`` (ConfigRecord): seed and training settings, and the experiment's fingerprint.

The reply carries ``"update"`` (ArrayRecord: trained layers' trained factors + head) and ``"metrics"``
(MetricRecord: train loss, FLOPs, examples, and the bytes the device measured it received), or
``"status"`` (ConfigRecord) when the device cannot take the job as sent (e.g. its held copy is gone).
Under secure aggregation the train message is the payload of SecAgg+'s training stage
(`flower.secagg`) and the reply is laid out as Flower's legacy fit result (`secure_reply_content`),
whose update Flower's `secaggplus_mod` masks and removes: only ``"metrics"`` stays in the clear.
Rank maps and layer lists travel as JSON strings: ConfigRecord lists must be non-empty and
homogeneous, and a JSON object keeps the layer -> rank pairing readable.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from hierfedlora.lora_state import State
from hierfedlora.protocol import DevicePlan, JobOutput, LocalDP, LocalTraining

TRAIN = "train"  # Flower message types
QUERY = "query"

PAYLOAD, PLAN, SETTINGS, UPDATE, METRICS, STATUS, EXPERIMENT, NODE = (
    "payload", "plan", "train", "update", "metrics", "status", "experiment", "node")
STALE_BASE = "stale-base"  # status: the device no longer holds the copy the server assumed
NOT_SET_UP = "not-set-up"  # status: the node never received the experiment (answer the query first)


# -- tensors -----------------------------------------------------------------------------------
def state_to_record(state: State) -> ArrayRecord:
    """Tensors -> ArrayRecord (float32 stays float32: the wire carries exactly what trains)."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in state.items()})


def record_to_state(rec: ArrayRecord) -> State:
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in rec.items()}


def tensor_bytes(rec: ArrayRecord) -> int:
    """Raw tensor bytes in a record (numel x itemsize): what our traffic meter counts at 4 B/param."""
    return int(sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in rec.values()))


def wire_bytes(content: RecordDict) -> int:
    """Bytes of the serialized objects Flower transfers for this content (arrays with their npy
    headers, record and message bodies), each distinct object once, as Flower's object store
    sends it. Falls back to the records' own `count_bytes` if the object API is unavailable."""
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        return int(sum(len(o.deflate()) for o in get_all_nested_objects(content).values()))
    except Exception:  # noqa: BLE001 - internal API; the public count is a close lower bound
        return int(sum(r.count_bytes() for r in content.values()))


# -- plans -------------------------------------------------------------------------------------
def plan_record(plan: DevicePlan, rnd: int, call: int, tag: str, base_tag: str) -> ConfigRecord:
    return ConfigRecord({
        "device": int(plan.device), "round": int(rnd), "call": int(call), "steps": int(plan.steps),
        "ranks": json.dumps({str(l): int(r) for l, r in sorted(plan.ranks.items())}),
        "train-layers": json.dumps([int(l) for l in plan.train_layers]),
        "link": plan.link, "download": plan.download, "options": json.dumps(plan.options, sort_keys=True),
        "frozen-factors": json.dumps(list(plan.frozen_factors)), "tag": tag, "base-tag": base_tag,
    })


def plan_from_record(rec: ConfigRecord) -> tuple[DevicePlan, int, int]:
    """(plan, round, call index) from a plan record."""
    plan = DevicePlan(
        device=int(rec["device"]),
        ranks={int(l): int(r) for l, r in json.loads(str(rec["ranks"])).items()},
        train_layers=tuple(int(l) for l in json.loads(str(rec["train-layers"]))),
        steps=int(rec["steps"]), link=str(rec["link"]), download=str(rec["download"]),
        options=json.loads(str(rec["options"])), frozen_factors=tuple(json.loads(str(rec["frozen-factors"]))),
    )
    return plan, int(rec["round"]), int(rec["call"])


def settings_record(s: LocalTraining, fingerprint: str, secagg_clip: float = 0.0) -> ConfigRecord:
    """The local-training settings (a device trains one job at a time: no lockstep; its method's
    loss terms are found by name on the device, `registry.trainer_options`); under secure
    aggregation the bound its update's entries must keep (`secagg-clip`; 0: not secure); with local
    DP its clip norm and noise multiplier, so the SuperNode privatises its update before replying."""
    rec = {"seed": int(s.seed), "batch-size": int(s.batch_size), "lr": float(s.lr),
           "weight-decay": float(s.weight_decay), "backward-ratio": float(s.backward_ratio), "fingerprint": fingerprint}
    if secagg_clip > 0:
        rec["secagg-clip"] = float(secagg_clip)
    if s.local_dp is not None:
        rec.update({"dp-clip-norm": float(s.local_dp.clip_norm), "dp-noise-multiplier": float(s.local_dp.noise_multiplier)})
    return ConfigRecord(rec)


def settings_from_record(rec: ConfigRecord, regularisers: dict[str, Any]) -> LocalTraining:
    local_dp = LocalDP(float(rec["dp-clip-norm"]), float(rec["dp-noise-multiplier"])) if "dp-clip-norm" in rec else None
    return LocalTraining(seed=int(rec["seed"]), batch_size=int(rec["batch-size"]), lr=float(rec["lr"]),
                         weight_decay=float(rec["weight-decay"]), backward_ratio=float(rec["backward-ratio"]),
                         regularisers=regularisers, local_dp=local_dp)


def train_content(payload: State, plan: DevicePlan, rnd: int, call: int, tag: str, base_tag: str,
                  settings: ConfigRecord) -> RecordDict:
    return RecordDict({PAYLOAD: state_to_record(payload), PLAN: plan_record(plan, rnd, call, tag, base_tag),
                       SETTINGS: settings})


# -- replies -----------------------------------------------------------------------------------
def reply_content(out: JobOutput, received_bytes: int) -> RecordDict:
    return RecordDict({
        UPDATE: state_to_record(out.update),
        METRICS: _metrics(out, received_bytes),
    })


def _metrics(out: JobOutput, received_bytes: int) -> MetricRecord:
    return MetricRecord({"train-loss": float(out.train_loss), "flops": float(out.flops),
                         "num-examples": int(out.num_examples), "received-bytes": int(received_bytes)})


def secure_reply_content(out: JobOutput, received_bytes: int, clip: float) -> RecordDict:
    """The reply to SecAgg+'s training stage: the update as a legacy fit result (its tensors in
    sorted key order, the order the server reads the mean in; weight = example count), which
    `secaggplus_mod` masks and clears, and our metrics. An entry beyond ±`clip` would be clipped
    into a wrong sum, so it fails the job instead."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    keys = sorted(out.update)
    big = max((float(out.update[k].abs().max()) for k in keys if out.update[k].numel()), default=0.0)
    if big > clip:
        raise ValueError(f"an update entry of {big:.3g} exceeds secagg-clip = {clip:g}: SecAgg+ would clip it; "
                         "raise secagg-clip")
    arrays = [out.update[k].detach().cpu().numpy() for k in keys]
    fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(out.num_examples), {})
    content = fitres_to_recorddict(fit, keep_input=True)
    content[METRICS] = _metrics(out, received_bytes)
    return content


def secure_output(content: RecordDict) -> JobOutput:
    """What the server sees of a device's reply under secure aggregation: no update, its metrics."""
    m = content.metric_records[METRICS]
    return JobOutput(update=None, train_loss=float(m["train-loss"]), flops=float(m["flops"]),
                     num_examples=int(m["num-examples"]))


def status_content(status: str, detail: str = "") -> RecordDict:
    return RecordDict({STATUS: ConfigRecord({"status": status, "detail": detail})})


def reply_status(content: RecordDict) -> str | None:
    """The status of a reply that carries no update (None for a normal reply)."""
    if STATUS in content.config_records:
        return str(content.config_records[STATUS]["status"])
    return None


def output_from_reply(content: RecordDict) -> JobOutput:
    m = content.metric_records[METRICS]
    return JobOutput(update=record_to_state(content.array_records[UPDATE]), train_loss=float(m["train-loss"]),
                     flops=float(m["flops"]), num_examples=int(m["num-examples"]))


# -- the experiment a node joins ---------------------------------------------------------------
def experiment_content(toml_text: str, fingerprint: str) -> RecordDict:
    return RecordDict({EXPERIMENT: ConfigRecord({"toml": toml_text, "fingerprint": fingerprint})})


def node_content(partition_id: int, num_examples: int, fingerprint: str) -> RecordDict:
    return RecordDict({NODE: ConfigRecord({"partition-id": int(partition_id), "num-examples": int(num_examples),
                                           "fingerprint": fingerprint})})
