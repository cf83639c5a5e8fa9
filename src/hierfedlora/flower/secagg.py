"""Secure aggregation on Flower: one aggregator's jobs of an exchange through Flower's SecAgg+.

`FlowerExecutor.run_summed` calls `secure_sum` once per aggregator (`Job.aggregator`) of an
exchange. It runs Flower's own `SecAggPlusWorkflow` over the grid, its four stages each one
`send_and_receive` (docs/flower.md, "Secure aggregation (SecAgg+)"):

1. *setup*: the SecAgg+ parameters go to the devices; each answers with two public keys;
2. *share keys*: each device gets its neighbours' keys and answers with encrypted key shares;
3. *collect masked vectors*: each device gets the shares addressed to it **and our own train
   message** (`messages.train_content`); the ClientApp trains exactly as without SecAgg+, and
   Flower's `secaggplus_mod` multiplies the update by the device's weight (its example count),
   quantises and masks [n_k, n_k·x_k] and sends only that;
4. *unmask*: the devices send the shares that remove the masks; the server obtains Σ n_k x_k and
   Σ n_k, hence the data-weighted mean, and never one device's update.

The workflow is Flower's, driven as it is meant to be: a `LegacyContext` whose legacy strategy
(`_Cohort`) names the aggregator's nodes in `configure_fit` and receives the mean in
`aggregate_fit`. The one change (`_Workflow`) is what stage 3 carries: our train messages instead
of empty legacy fit instructions, so a device's plan and tensors travel in our wire format. A
`_MeteredGrid` between the workflow and the grid counts every stage's bytes and keeps the stage-3
replies, whose metrics (train loss, FLOPs, examples) are the server's to see.

Quantisation (Flower's `quantize` / `dequantize`): each weighted entry n_k/W·x (W = the largest
example count of the cohort, so the factor is ≤ 1) is clipped to [-c, c] (`SecAggOptions.clip`)
and stochastically rounded to one of Q = 2^30 levels, so each device adds at most one quantum 2c/Q
of error and the mean is off by at most N·2c/Q per entry (N devices; c = 4, N = 3: 2.2e-8). The
masks live modulo M = 2^40, which holds the sum of up to M/Q − 1 = 1023 devices exactly. A device
whose update has an entry beyond ±c fails its job instead of being silently clipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from hierfedlora.flower import messages as wire
from hierfedlora.flower.run_config import SecAggOptions
from hierfedlora.lora_state import State

QUANTIZATION_RANGE = 2**30  # Q: levels per weighted entry (Flower quantises into int32)
MODULUS_RANGE = 2**40  # M: masks and sums live modulo M; N·Q < M for N ≤ 1023 devices
MAX_DEVICES = MODULUS_RANGE // QUANTIZATION_RANGE - 1
SETUP_STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.UNMASK)  # the key-exchange stages around the training one


@dataclass
class Outcome:
    """What one aggregator's secure round gave: the mean of the summed updates (None: SecAgg+
    halted, nothing was summed), the devices' nodes in the sum, every stage's bytes per node and
    the training stage's replies (masked vectors; metrics in the clear)."""

    mean: State | None
    summed: list[int]
    down: dict[int, dict[str, int]] = field(default_factory=dict)  # node -> stage -> wire bytes sent to it
    up: dict[int, dict[str, int]] = field(default_factory=dict)  # node -> stage -> wire bytes it sent
    replies: dict[int, Message] = field(default_factory=dict)  # node -> its reply to the training stage
    errors: dict[int, str] = field(default_factory=dict)  # node -> why it left the protocol (stage: reason)


class _MeteredGrid:
    """The grid as the workflow sees it: each `send_and_receive` is one SecAgg+ stage, whose bytes
    per node go into `outcome`; the training stage's replies are kept."""

    def __init__(self, grid, outcome: Outcome):
        self.grid, self.outcome = grid, outcome

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else ""
        for m in messages:
            self.outcome.down.setdefault(m.metadata.dst_node_id, {})[stage] = wire.wire_bytes(m.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = set()
        for r in replies:
            nid = r.metadata.src_node_id
            answered.add(nid)
            if r.has_error():
                self.outcome.errors.setdefault(nid, f"error in SecAgg+ {stage}: {r.error.reason}")
                continue
            self.outcome.up.setdefault(nid, {})[stage] = wire.wire_bytes(r.content)
            if stage == Stage.COLLECT_MASKED_VECTORS:
                self.outcome.replies[nid] = r
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.outcome.errors.setdefault(m.metadata.dst_node_id, f"timeout in SecAgg+ {stage}")
        return replies


class _Cohort(Strategy):
    """The legacy strategy the workflow asks: which nodes take part, and what to do with the mean."""

    def __init__(self, grid, nodes: list[int]):
        self.grid, self.nodes = grid, nodes
        self.mean: list[np.ndarray] | None = None
        self.summed: list[int] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(n, self.grid, 0), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        # every result carries the same parameters: the unmasked mean Σ n_k x_k / Σ n_k
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            self.summed = [proxy.node_id for proxy, _ in results]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ whose training stage carries our train messages (`contents`, by node)."""

    def __init__(self, contents: dict[int, RecordDict], **kw: Any):
        super().__init__(**kw)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return ok


def secure_sum(grid, rnd: int, contents: dict[int, RecordDict], keys: list[str], shapes: dict[str, tuple[int, ...]],
               max_weight: float, opts: SecAggOptions, timeout: float) -> Outcome:
    """Run one SecAgg+ round over the nodes of `contents` (node -> train message content); the
    mean comes back as the `keys` (sorted: the order devices send them in) at `shapes`."""
    if len(contents) > MAX_DEVICES:
        raise ValueError(f"secure aggregation sums at most {MAX_DEVICES} devices per aggregator, got {len(contents)}")
    outcome = Outcome(None, [])
    cohort = _Cohort(grid, sorted(contents))
    workflow = _Workflow(contents, num_shares=float(opts.shares), reconstruction_threshold=float(opts.threshold),
                         max_weight=float(max_weight), clipping_range=float(opts.clip),
                         quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE, timeout=timeout)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: int(rnd)}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=cohort)
    workflow(_MeteredGrid(grid, outcome), context)
    if cohort.mean is not None:
        if len(cohort.mean) != len(keys) or any(a.shape != shapes[k] for a, k in zip(cohort.mean, keys)):
            raise ValueError("the securely summed update does not have the tensors the plans upload")
        outcome.mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in zip(keys, cohort.mean)}
        outcome.summed = cohort.summed
    return outcome


def masked_bytes(reply: Message) -> int:
    """Bytes of the masked vectors a device sent (int64 entries with npy headers, and its weight)."""
    return int(sum(len(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]))
