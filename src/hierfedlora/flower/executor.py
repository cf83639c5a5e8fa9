"""FlowerExecutor: the engine's executor seam, backed by Flower SuperNodes (design.md §1.2).

`Simulation` hands every `ctx.train(jobs)` of any strategy to `executor.run(rnd, jobs)`; this class
turns the jobs into Flower messages (`messages.train_content`), sends them with
`grid.send_and_receive` under a timeout, and maps the replies back to `JobOutput` (None for a device
that failed, timed out or has no SuperNode). The strategy, the server state, evaluation, metrics and
checkpoints stay in the engine, so a Flower run writes the same run directory as `hierfedlora run`,
plus:

- ``flower_nodes.jsonl``: node events (joined, left, replaced) and, per training call, which devices
  were sent a job, which replied and why the others did not;
- ``flower_traffic.jsonl``: per job, the bytes our traffic meter booked beside the bytes Flower
  carried (raw tensor bytes, the records' byte count, the serialized objects), both directions.

Under secure aggregation (`run_summed`) each aggregator's jobs of a call go through Flower's SecAgg+
instead (`flower.secagg`): the server receives the mean of their updates and each device's metrics,
and the traffic rows count the key-exchange stages too (`flower_secagg_*`).

Devices are mapped to node IDs by asking each new node for its ``partition-id`` (a ``query``
message) — never by guessing IDs; a node that disappears is unmapped and a restarted one rejoins
at the next training call.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w
import torch
from flwr.app import Message

from hierfedlora.config import ExperimentConfig
from hierfedlora.flower import messages as wire
from hierfedlora.flower.run_config import NODES_LOG, TRAFFIC_LOG, TRAFFIC_SUMMARY, SecAggOptions
from hierfedlora.lora_state import State, num_bytes
from hierfedlora.protocol import DeviceJob, Executor, ExecutorBase, JobOutput, Scores, Summed

QUERY_ATTEMPTS = 3  # a node that does not answer its identity query is asked this often, then ignored


@dataclass
class TrafficRow:
    """One job's line in ``flower_traffic.jsonl`` (docs/flower.md, "What the run directory records"):
    what our meter booked beside what Flower carried, each direction, and how the job ended.

    `status` is "ok", "no-node", "timeout", "error: ...", "resent-full" (the device had lost its
    copy and got the full payload; the counts then include both attempts) or a device status.
    Under secure aggregation the `flower_*` counts are SecAgg+'s training stage (the train message
    with the key shares for the device; the masked vectors back, `flower_up_tensor` their bytes) and
    `flower_secagg_*` its other three stages (keys and shares), both directions."""

    round: int
    call: int
    device: int
    node_id: int | None
    link: str
    download: str
    status: str = "ok"
    meter_down: int = 0  # what the engine's meter booked (`bytes_down`, `bytes_up`)
    meter_up: int = 0
    flower_down_tensor: int = 0  # raw tensor bytes in the records
    flower_down_array: int = 0  # the ArrayRecord's count_bytes()
    flower_down_wire: int = 0  # every serialized Flower object of the content, each distinct one once
    flower_up_tensor: int = 0
    flower_up_array: int = 0
    flower_up_wire: int = 0
    device_received_wire: int = 0  # the wire count as the device measured it
    sent_keys: int | None = None  # tensors in the last payload sent (None: nothing was sent)
    wall_s: float = 0.0  # the training call's wall-clock seconds
    flower_secagg_down_wire: int | None = None  # SecAgg+'s setup, share-keys and unmask stages (None: not secure)
    flower_secagg_up_wire: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON row: every field, except those that are None (a job never sent, a plain job)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k == "node_id"}

    def byte_counts(self) -> dict[str, int]:
        """The byte counters (meter_*, flower_*, device_*), as the traffic totals add them."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name.startswith(("meter_", "flower_", "device_")) and getattr(self, f.name) is not None}


@dataclass
class _Job:
    """One device job within a training call, as it goes out and comes back."""

    job: DeviceJob
    keys: list[str]  # what the plan downloads (`DevicePlan.downloaded`)
    row: TrafficRow
    msg: Message | None = None  # the message last sent (None: the device has no node)
    holds: tuple[str, State] | None = None  # (tag, full payload) the device keeps once it trains
    output: JobOutput | None = None


class FlowerExecutor(ExecutorBase):
    """Runs device jobs on SuperNodes through a Flower `Grid` (see module docstring)."""

    def __init__(self, grid, cfg: ExperimentConfig, out_dir: str | Path | None, evaluator: Executor, *,
                 round_timeout: float = 600.0, node_wait: float = 120.0, query_timeout: float = 120.0,
                 resume: bool = False, secagg: SecAggOptions | None = None, log=print):
        from hierfedlora.engine import config_fingerprint, local_training

        self.grid, self.cfg = grid, cfg
        self.evaluator = evaluator  # evaluation runs on the server's model (`engine.local_executor`)
        self.out = Path(out_dir) if out_dir else None
        self.round_timeout, self.node_wait, self.query_timeout = float(round_timeout), float(node_wait), float(query_timeout)
        self.log = log
        self.fingerprint = config_fingerprint(cfg)
        self.toml = tomli_w.dumps(cfg.to_dict())
        self.secagg = secagg or SecAggOptions()
        clip = self.secagg.clip if cfg.fleet.secure_aggregation else 0.0
        self.settings = wire.settings_record(local_training(cfg), self.fingerprint, clip)
        self.examples: dict[int, int] = {}  # device -> its example count, as its node reported it
        self.nodes: dict[int, int] = {}  # device (partition-id) -> node id
        self.known: dict[int, int | None] = {}  # node id -> device it plays (None: unusable node)
        self.query_tries: dict[int, int] = {}
        self.held: dict[int, tuple[str, State]] = {}  # device -> (tag, full payload) it keeps, as the device does
        self.totals: dict[int, dict[str, int]] = {}
        self.started = False
        self.resume = resume
        self._rnd, self._calls = 0, 0

    # -- run-directory logs ------------------------------------------------------------------
    def _append(self, name: str, row: dict[str, Any]) -> None:
        if self.out is not None:
            with open(self.out / name, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _event(self, rnd: int, event: str, **kw: Any) -> None:
        row = {"time": round(time.time(), 3), "round": rnd, "event": event, **kw}
        self._append(NODES_LOG, row)
        if event != "train":
            self.log(f"[flower] round {rnd}: {event} {kw}")

    def _clear_logs(self) -> None:
        """A fresh run starts its logs empty (the engine has cleared its own files by now)."""
        if self.out is not None and not self.resume:
            for name in (NODES_LOG, TRAFFIC_LOG, TRAFFIC_SUMMARY):
                (self.out / name).unlink(missing_ok=True)

    # -- which node plays which device -------------------------------------------------------
    def refresh(self, rnd: int) -> None:
        """Unmap nodes that left; ask nodes we do not know yet which device they play."""
        present = set(self.grid.get_node_ids())
        for nid in [n for n in self.known if n not in present]:
            self._node_left(rnd, nid)
        new = sorted(n for n in present if n not in self.known and self.query_tries.get(n, 0) < QUERY_ATTEMPTS)
        if new:
            self._query(rnd, new)

    def _node_left(self, rnd: int, nid: int) -> None:
        dev = self.known.pop(nid)
        if dev is not None and self.nodes.get(dev) == nid:
            del self.nodes[dev]
            self.held.pop(dev, None)
        self._event(rnd, "left", node_id=nid, device=dev)

    def _query(self, rnd: int, new: list[int]) -> None:
        """Send the experiment to each new node; it answers with the device it plays."""
        content = wire.experiment_content(self.toml, self.fingerprint)
        msgs = [Message(content, dst_node_id=nid, message_type=wire.QUERY, group_id=f"query-{rnd}",
                        ttl=self.query_timeout + 60) for nid in new]
        replies = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(msgs, timeout=self.query_timeout)}
        for nid in new:
            r = replies.get(nid)
            if r is None:
                self.query_tries[nid] = self.query_tries.get(nid, 0) + 1
                self._event(rnd, "query-timeout", node_id=nid, attempt=self.query_tries[nid])
            elif r.has_error():
                self.known[nid] = None
                self._event(rnd, "query-error", node_id=nid, reason=r.error.reason)
            else:
                node = r.content.config_records[wire.NODE]
                self.examples[int(node["partition-id"])] = int(node["num-examples"])
                self._map(rnd, int(node["partition-id"]), nid)

    def _map(self, rnd: int, dev: int, nid: int) -> None:
        """Device `dev` is node `nid` from now on; a node that played it before is unusable."""
        self.known[nid] = dev
        old = self.nodes.get(dev)
        if old is not None and old != nid:
            self.known[old] = None
            self._event(rnd, "replaced", device=dev, node_id=nid, old_node_id=old)
        else:
            self._event(rnd, "joined", device=dev, node_id=nid)
        self.nodes[dev] = nid
        self.held.pop(dev, None)

    def wait_for_nodes(self, rnd: int) -> None:
        """At the start: wait (up to `node_wait` s) until every device of the fleet has a node."""
        want = set(range(self.cfg.fleet.num_devices))
        deadline = time.monotonic() + self.node_wait
        while True:
            self.refresh(rnd)
            missing = sorted(want - set(self.nodes))
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        self._event(rnd, "start", nodes=self._node_map(), missing=missing)

    def _node_map(self) -> dict[str, int]:
        """device -> node id, as the logs and the summary write it."""
        return {str(d): n for d, n in sorted(self.nodes.items())}

    # -- the executor seam -------------------------------------------------------------------
    def run(self, rnd: int, jobs: list[DeviceJob]) -> list[JobOutput | None]:
        """One training call: a message per job, one `send_and_receive` (plus one for resends)
        under `round_timeout`, a traffic row per job and a participation event."""
        self._begin_call(rnd)
        work = [self._prepare(rnd, job) for job in jobs]
        t0 = time.monotonic()
        self._exchange(rnd, work, deadline=t0 + self.round_timeout)
        self._record(rnd, work, wall_s=round(time.monotonic() - t0, 3))
        return [w.output for w in work]

    def run_summed(self, rnd: int, jobs: list[DeviceJob],
                   aggregators: list[int]) -> tuple[list[JobOutput | None], dict[int, Summed]]:
        """One training call under secure aggregation: per aggregator, one SecAgg+ round over its
        jobs' nodes (`secagg.secure_sum`); outputs without updates, and each aggregator's mean."""
        from hierfedlora.flower.secagg import secure_sum

        self._begin_call(rnd)
        work = [self._prepare(rnd, job) for job in jobs]
        t0 = time.monotonic()
        deadline = t0 + self.round_timeout
        sums: dict[int, Summed] = {}
        for a in dict.fromkeys(aggregators):
            mine = [w for w, g in zip(work, aggregators) if g == a and w.msg is not None]
            if not mine:
                continue
            by_node = {w.msg.metadata.dst_node_id: w for w in mine}
            plan, payload, _ = mine[0].job
            keys = sorted(plan.uploaded(payload))
            for w in mine:
                self._count_down(w.row, w.msg)
            outcome = secure_sum(self.grid, rnd, {n: w.msg.content for n, w in by_node.items()}, keys,
                                 {k: tuple(payload[k].shape) for k in keys},
                                 max(self.examples.get(w.job.plan.device, 1) for w in mine), self.secagg,
                                 timeout=max(1.0, deadline - time.monotonic()))
            for nid, w in by_node.items():
                self._read_secure(w, nid, outcome)
            if outcome.mean is not None:
                devices = tuple(by_node[n].job.plan.device for n in outcome.summed)
                weight = float(sum(by_node[n].output.num_examples for n in outcome.summed))
                sums[a] = Summed(outcome.mean, weight, devices)
        self._record(rnd, work, wall_s=round(time.monotonic() - t0, 3))
        return [w.output for w in work], sums

    def _read_secure(self, w: _Job, nid: int, outcome) -> None:
        """One device's part of a SecAgg+ round: its bytes per stage, and its metrics if its
        masked update is in the sum (else why not)."""
        from hierfedlora.flower.secagg import SETUP_STAGES, masked_bytes

        device, row = w.job.plan.device, w.row
        down, up = outcome.down.get(nid, {}), outcome.up.get(nid, {})
        row.flower_secagg_down_wire = sum(v for s, v in down.items() if s in SETUP_STAGES)
        row.flower_secagg_up_wire = sum(v for s, v in up.items() if s in SETUP_STAGES)
        row.flower_down_wire = sum(v for s, v in down.items() if s not in SETUP_STAGES)  # train message + shares
        reply = outcome.replies.get(nid)
        if reply is not None:
            row.flower_up_wire = sum(v for s, v in up.items() if s not in SETUP_STAGES)
            row.flower_up_tensor = masked_bytes(reply)
            row.device_received_wire = int(reply.content.metric_records[wire.METRICS]["received-bytes"])
        if outcome.mean is not None and nid in outcome.summed:
            w.output = wire.secure_output(reply.content)
            row.meter_up = num_bytes(w.job.payload, self.cfg.fleet.bytes_per_param, w.job.plan.uploaded(w.job.payload))
            self.held[device] = w.holds
        else:
            row.status = outcome.errors.get(nid, "secagg-halted: too few devices finished SecAgg+")
            self.held.pop(device, None)

    def _begin_call(self, rnd: int) -> None:
        """Map nodes (at the first call: wait for the fleet) and count the calls of this round."""
        if not self.started:
            self._clear_logs()
            self.wait_for_nodes(rnd)
            self.started = True
        else:
            self.refresh(rnd)
        if rnd != self._rnd:
            self._rnd, self._calls = rnd, 0
        self._calls += 1

    def _prepare(self, rnd: int, job: DeviceJob) -> _Job:
        """The job's traffic row and, if its device has a node, its message."""
        plan, payload, call = job
        keys = plan.downloaded(payload)
        row = TrafficRow(round=rnd, call=call, device=plan.device, node_id=self.nodes.get(plan.device),
                         link=plan.link, download=plan.download,
                         meter_down=num_bytes(payload, self.cfg.fleet.bytes_per_param, keys))
        w = _Job(job, keys, row)
        if plan.device in self.nodes:
            self._address(rnd, w, full=False)
        else:
            row.status = "no-node"
        return w

    def _exchange(self, rnd: int, work: list[_Job], deadline: float) -> None:
        """Send the jobs and read the replies; a device that lost its held copy gets the full
        payload in a second send before the same deadline."""
        pending = [w for w in work if w.msg is not None]
        for attempt in range(2):
            if not pending:
                break
            replies = self._send(pending, deadline)
            pending = [w for w, r in zip(pending, replies) if self._read_reply(rnd, w, r, may_resend=attempt == 0)]

    def _send(self, pending: list[_Job], deadline: float) -> list[Message | None]:
        """Each job's reply, in order (None: none before the deadline)."""
        for w in pending:
            self._count_down(w.row, w.msg)
        replies = self.grid.send_and_receive([w.msg for w in pending], timeout=max(1.0, deadline - time.monotonic()))
        by_id = {r.metadata.reply_to_message_id: r for r in replies}
        return [by_id.get(w.msg.metadata.message_id) for w in pending]

    def _read_reply(self, rnd: int, w: _Job, reply: Message | None, may_resend: bool) -> bool:
        """Take one reply into its job; True when the job is to be sent again with the full payload.
        `held` follows the device: it keeps the payload of a job it trained, and nothing else."""
        device = w.job.plan.device
        if reply is None:
            w.row.status = "timeout"
        elif reply.has_error():
            w.row.status = f"error: {reply.error.reason}"
        elif (status := wire.reply_status(reply.content)) == wire.STALE_BASE and may_resend:
            w.row.status = "resent-full"
            self._address(rnd, w, full=True)
            return True
        elif status is not None:
            w.row.status = f"{status}: {reply.content.config_records[wire.STATUS]['detail']}"
            if status == wire.NOT_SET_UP:  # ask it again at the next call
                self.known.pop(self.nodes.pop(device, -1), None)
        else:
            w.output = wire.output_from_reply(reply.content)
            self._count_up(w.row, reply.content, w.output)
            self.held[device] = w.holds
        if w.output is None:
            self.held.pop(device, None)
        return False

    def _record(self, rnd: int, work: list[_Job], wall_s: float) -> None:
        """Write each job's traffic row, add the completed ones to the totals, log the call."""
        for w in work:
            w.row.wall_s = wall_s
            self._append(TRAFFIC_LOG, w.row.to_json())
            if w.output is not None:
                tot = self.totals.setdefault(w.row.device, {})
                for key, v in w.row.byte_counts().items():
                    tot[key] = tot.get(key, 0) + v
        failed = {w.row.device: w.row.status for w in work if w.output is None}
        self._event(rnd, "train", call=self._calls, sent=[w.row.device for w in work if w.row.status != "no-node"],
                    ok=[w.row.device for w in work if w.output is not None],
                    failed={str(d): s for d, s in failed.items()}, wall_s=wall_s)
        if failed:
            self.log(f"[flower] round {rnd}: devices dropped {failed}")

    # -- one message -------------------------------------------------------------------------
    def _address(self, rnd: int, w: _Job, full: bool) -> None:
        """Build the job's message to its device's node (see `_to_send` for what it carries)."""
        plan, payload, call = w.job
        send, base = self._to_send(w, full)
        tag = f"r{rnd}.c{call}.d{plan.device}.{uuid.uuid4().hex[:8]}"
        content = wire.train_content(send, plan, rnd, call, tag, base, self.settings)
        w.msg = Message(content, dst_node_id=self.nodes[plan.device], message_type=wire.TRAIN, group_id=str(rnd),
                        ttl=self.round_timeout + 60)
        w.holds = (tag, payload)
        w.row.sent_keys = len(send)

    def _to_send(self, w: _Job, full: bool) -> tuple[State, str]:
        """(tensors, base tag): only what the device trains (`DevicePlan.uploaded`), with the tag of its copy,
        when the device verifiably holds the frozen ones (`held` mirrors what each device keeps);
        else the whole payload and no base."""
        plan, payload, _ = w.job
        held = self.held.get(plan.device)
        if full or plan.download != "trained" or held is None:
            return payload, ""
        tag, copy = held
        keys = set(w.keys)
        if all(_same(copy.get(k), payload[k]) for k in payload if k not in keys):
            return {k: payload[k] for k in w.keys}, tag
        return payload, ""

    @staticmethod
    def _count_down(row: TrafficRow, msg: Message) -> None:
        rec = msg.content.array_records[wire.PAYLOAD]
        row.flower_down_tensor += wire.tensor_bytes(rec)
        row.flower_down_array += rec.count_bytes()
        row.flower_down_wire += wire.wire_bytes(msg.content)

    def _count_up(self, row: TrafficRow, content, out: JobOutput) -> None:
        rec = content.array_records[wire.UPDATE]
        row.meter_up = num_bytes(out.update, self.cfg.fleet.bytes_per_param)
        row.flower_up_tensor = wire.tensor_bytes(rec)
        row.flower_up_array = rec.count_bytes()
        row.flower_up_wire = wire.wire_bytes(content)
        row.device_received_wire = int(content.metric_records[wire.METRICS]["received-bytes"])

    # -- the end of the run ------------------------------------------------------------------
    def evaluate(self, payload: State, ranks: dict[int, int], batches: list) -> Scores:
        return self.evaluator.evaluate(payload, ranks, batches)

    def close(self) -> None:
        self.evaluator.close()

    def traffic_summary(self) -> dict[str, Any]:
        """Totals over completed jobs, per device and overall, meter vs Flower."""
        total: dict[str, int] = {}
        for t in self.totals.values():
            for k, v in t.items():
                total[k] = total.get(k, 0) + v
        meter = total.get("meter_down", 0) + total.get("meter_up", 0)
        tensor = total.get("flower_down_tensor", 0) + total.get("flower_up_tensor", 0)
        wire_total = total.get("flower_down_wire", 0) + total.get("flower_up_wire", 0)
        return {
            "per_device": {str(d): t for d, t in sorted(self.totals.items())},
            "total": total,
            "meter_bytes": meter, "flower_tensor_bytes": tensor, "flower_wire_bytes": wire_total,
            "wire_over_meter": (wire_total / meter) if meter else None,
            "bytes_per_param": self.cfg.fleet.bytes_per_param,
            "nodes": self._node_map(),
        }


def _same(held: torch.Tensor | None, t: torch.Tensor) -> bool:
    """Whether the device's copy of a tensor is exactly the one the server would send."""
    return held is not None and held.shape == t.shape and torch.equal(held, t)
