"""The device side of a Flower deployment: a ClientApp that runs our local trainer (design.md §1.2).

A SuperNode is one device of the fleet: its node config names the device (``partition-id``),
and with it the data partition and the profile the server books its time with. The ClientApp
answers two messages:

- ``query``: the server sends the experiment (its config as TOML and a fingerprint); the node
  builds the same data workload as the simulator, keeps only its partition in the run's context
  state, and replies with its partition id. This is how the server maps devices to node IDs.
- ``train``: a plan and its tensors; the node calls `device.train.run_job`, the very function the
  simulator calls, so with the same seed it computes the same update.

Under secure aggregation (`fleet.secure_aggregation`) ``train`` messages are the four stages of
Flower's SecAgg+ (`flower.secagg`): `_secure` hands the messages that carry a SecAgg+ stage to
Flower's `secaggplus_mod`, which answers the key-exchange stages itself and, at the training stage,
calls `train` and masks its update, so the update never leaves the node in the clear.

Flower starts a fresh ClientApp process per message, so everything that must outlive a message
(the partition, the last full payload for ``download="trained"``) lives in ``context.state``;
the model is rebuilt from the seed (cached per process where the runtime reuses processes).
"""

from __future__ import annotations

import tomllib
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from hierfedlora.errors import ConfigError
from hierfedlora.flower import messages as wire

SETUP = "hierfedlora.setup"  # context.state records
DATA = "hierfedlora.data"
HELD = "hierfedlora.held"
HELD_TAG = "hierfedlora.held-tag"

app = ClientApp()
_cache: dict[str, Any] = {}  # per process: config and model by experiment fingerprint


def partition_id(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if value is None:
        raise ConfigError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config 'partition-id=K' (K = the device index it plays).")
    return int(value)


def _config(toml_text: str, fingerprint: str):
    key = "cfg:" + fingerprint
    if key not in _cache:
        import torch

        from hierfedlora.config import build_config

        cfg = build_config(tomllib.loads(toml_text))  # also imports the strategies (their regularisers)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        _cache[key] = cfg
    return _cache[key]


def _set_up(context: Context, toml_text: str, fingerprint: str, pid: int) -> int:
    """Build the workload exactly as the simulator does and keep this device's partition."""
    from hierfedlora.engine import build_workload
    from hierfedlora.device.model import load_tokenizer

    cfg = _config(toml_text, fingerprint)
    if not 0 <= pid < cfg.fleet.num_devices:
        raise ConfigError(f"partition-id {pid} is outside this experiment's fleet (fleet.num_devices = "
                         f"{cfg.fleet.num_devices}); give this SuperNode a partition-id in 0..{cfg.fleet.num_devices - 1}.")
    tok = load_tokenizer(cfg.model.name)
    if cfg.task.kind == "instruction":  # open answers are clustered by the frozen model's embeddings, as in the simulator
        from hierfedlora.device.model import load_base

        base = load_base(cfg.model.name, 0, tok, cfg.run.seed, task="instruction")
        w = build_workload(cfg, tok, base.get_input_embeddings().weight.detach())
    else:
        w = build_workload(cfg, tok)
    pos = w.parts[pid].astype(np.int64)
    lens = np.array([len(w.ids[i]) for i in pos], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    ids = np.concatenate([w.ids[i] for i in pos]).astype(np.int32) if len(pos) else np.zeros(0, np.int32)
    plens = w.prompt_lens[pos] if w.prompt_lens is not None else None
    context.state[DATA] = _data_record(pos, offsets, ids, w.labels[pos], plens)
    context.state[SETUP] = ConfigRecord({"toml": toml_text, "fingerprint": fingerprint, "partition-id": pid,
                                         "pad-id": int(w.pad_id), "num-classes": int(w.num_classes),
                                         "vocab-size": len(tok)})
    return len(pos)


def _data_record(pos: np.ndarray, offsets: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                 prompt_lens: np.ndarray | None = None) -> ArrayRecord:
    from flwr.app import Array

    arrays = {"positions": Array(pos), "offsets": Array(offsets), "ids": Array(ids),
              "labels": Array(labels.astype(np.int64))}
    if prompt_lens is not None:  # instruction tuning: where each example's response starts
        arrays["prompt-lens"] = Array(prompt_lens.astype(np.int64))
    return ArrayRecord(arrays)


def _device_data(context: Context):
    """The partition as `DeviceData`, indexed by the same global positions as in the simulator."""
    from hierfedlora.device.train import DeviceData

    rec = context.state.array_records[DATA]
    pos, offsets, ids, labels = (rec[k].numpy() for k in ("positions", "offsets", "ids", "labels"))
    size = int(pos.max()) + 1 if len(pos) else 0
    all_ids: list = [None] * size
    all_labels = np.zeros(size, dtype=np.int64)
    for j, p in enumerate(pos):
        all_ids[p] = ids[offsets[j]:offsets[j + 1]]
        all_labels[p] = labels[j]
    plens = None
    if "prompt-lens" in rec:
        plens = np.zeros(size, dtype=np.int64)
        plens[pos] = rec["prompt-lens"].numpy()
    return DeviceData(all_ids, all_labels, pos, int(context.state.config_records[SETUP]["pad-id"]), plens)


class _TokenizerFacts:
    """What `device.model.load_base` reads from a tokenizer (its size and pad id), kept from the query so a
    training process does not load the tokenizer again (Flower starts one process per message)."""

    def __init__(self, vocab_size: int, pad_token_id: int):
        self.vocab_size, self.pad_token_id = vocab_size, pad_token_id

    def __len__(self) -> int:
        return self.vocab_size


def _model(cfg, setup: ConfigRecord):
    key = "model:" + str(setup["fingerprint"])
    if key not in _cache:
        from hierfedlora.device.model import load_base, resolve_device
        from hierfedlora.fast.model import FastModel  # the simulator's model: the same numbers

        tok = _TokenizerFacts(int(setup["vocab-size"]), int(setup["pad-id"]))
        base = load_base(cfg.model.name, int(setup["num-classes"]), tok, cfg.run.seed, task=cfg.task.kind)
        device = resolve_device(cfg.train.device)
        _cache[key] = FastModel(base, cfg.model.target_modules, cfg.model.rank, cfg.model.alpha,
                                cfg.model.lora_dropout, cfg.run.seed, device)
    return _cache[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = partition_id(context)
    exp = msg.content.config_records[wire.EXPERIMENT]
    toml_text, fp = str(exp["toml"]), str(exp["fingerprint"])
    setup = context.state.config_records.get(SETUP)
    if setup is None or setup["fingerprint"] != fp or int(setup["partition-id"]) != pid:
        _set_up(context, toml_text, fp, pid)
    n = len(context.state.array_records[DATA]["positions"].numpy())
    return Message(wire.node_content(pid, n, fp), reply_to=msg)


def _secure(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ mod for a message that carries a SecAgg+ stage; any other passes through."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[_secure])
def train(msg: Message, context: Context) -> Message:
    from hierfedlora.lora_state import layer_of
    from hierfedlora.protocol import DeviceJob
    from hierfedlora.strategies.registry import trainer_options
    from hierfedlora.device.train import run_job

    received = wire.wire_bytes(msg.content)
    setup = context.state.config_records.get(SETUP)
    settings = msg.content.config_records[wire.SETTINGS]
    clip = float(settings.get("secagg-clip", 0.0))  # > 0: a SecAgg+ training stage (`_secure`)
    if setup is None or setup["fingerprint"] != settings["fingerprint"]:
        return _status(msg, clip, wire.NOT_SET_UP, "answer the experiment query first")
    plan_rec = msg.content.config_records[wire.PLAN]
    plan, rnd, call = wire.plan_from_record(plan_rec)
    if plan.device != int(setup["partition-id"]):
        raise ValueError(f"this node plays device {setup['partition-id']} but got a plan for device {plan.device}")
    payload = wire.record_to_state(msg.content.array_records[wire.PAYLOAD])
    base_tag = str(plan_rec["base-tag"])
    if base_tag:  # frozen layers and factors come from the copy downloaded earlier
        held_tag = context.state.config_records.get(HELD_TAG)
        if held_tag is None or str(held_tag["tag"]) != base_tag or HELD not in context.state.array_records:
            return _status(msg, clip, wire.STALE_BASE, f"holds {held_tag['tag'] if held_tag else None}")
        for k, t in wire.record_to_state(context.state.array_records[HELD]).items():
            layer = layer_of(k)
            if k not in payload and (layer is None or plan.ranks.get(layer, 0) > 0):
                payload[k] = t
    context.state[HELD] = wire.state_to_record(payload)
    context.state[HELD_TAG] = ConfigRecord({"tag": str(plan_rec["tag"])})

    cfg = _config(str(setup["toml"]), str(setup["fingerprint"]))
    model = _model(cfg, setup)
    out = run_job(model, _device_data(context), DeviceJob(plan, payload, call), rnd,
                  wire.settings_from_record(settings, trainer_options()))
    if clip > 0:
        return Message(wire.secure_reply_content(out, received, clip), reply_to=msg)
    return Message(wire.reply_content(out, received), reply_to=msg)


def _status(msg: Message, clip: float, status: str, detail: str) -> Message:
    """A job the device cannot take as sent: a status reply, or inside SecAgg+ (which has no such
    reply: the device leaves the protocol and the server reads why) an error."""
    if clip > 0:
        raise RuntimeError(f"{status}: {detail}")
    return Message(wire.status_content(status, detail), reply_to=msg)
