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

Devices are mapped to node IDs by asking each new node for its ``partition-id`` (a ``query``
message) — never by guessing IDs; a node that disappears is unmapped and a restarted one rejoins
at the next training call.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import tomli_w
import torch
from flwr.app import Message

from hierfedlora.config import ExperimentConfig
from hierfedlora.flower import messages as wire
from hierfedlora.lora_state import State, num_bytes
from hierfedlora.protocol import DeviceJob, DevicePlan, Executor, JobOutput

QUERY_ATTEMPTS = 3  # a node that does not answer its identity query is asked this often, then ignored


class FlowerExecutor:
    """Runs device jobs on SuperNodes through a Flower `Grid` (see module docstring)."""

    def __init__(self, grid, cfg: ExperimentConfig, out_dir: str | Path | None, evaluator: Executor, *,
                 round_timeout: float = 600.0, node_wait: float = 120.0, query_timeout: float = 120.0,
                 resume: bool = False, log=print):
        from hierfedlora.engine import config_fingerprint, local_training

        self.grid, self.cfg = grid, cfg
        self.evaluator = evaluator  # evaluation runs on the server's model (`engine.LocalExecutor`)
        self.out = Path(out_dir) if out_dir else None
        self.round_timeout, self.node_wait, self.query_timeout = float(round_timeout), float(node_wait), float(query_timeout)
        self.log = log
        self.fingerprint = config_fingerprint(cfg)
        self.toml = tomli_w.dumps(cfg.to_dict())
        self.settings = wire.settings_record(local_training(cfg), self.fingerprint)
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
        self._append("flower_nodes.jsonl", row)
        if event not in ("train",):
            self.log(f"[flower] round {rnd}: {event} {kw}")

    # -- which node plays which device -------------------------------------------------------
    def refresh(self, rnd: int) -> None:
        """Unmap nodes that left; ask nodes we do not know yet which device they play."""
        present = set(self.grid.get_node_ids())
        for nid in [n for n in self.known if n not in present]:
            dev = self.known.pop(nid)
            if dev is not None and self.nodes.get(dev) == nid:
                del self.nodes[dev]
                self.held.pop(dev, None)
            self._event(rnd, "left", node_id=nid, device=dev)
        new = sorted(n for n in present if n not in self.known and self.query_tries.get(n, 0) < QUERY_ATTEMPTS)
        if not new:
            return
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
                dev = int(r.content.config_records[wire.NODE]["partition-id"])
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
        self._event(rnd, "start", nodes={str(d): n for d, n in sorted(self.nodes.items())}, missing=missing)

    # -- the executor seam -------------------------------------------------------------------
    def run(self, rnd: int, jobs: list[DeviceJob]) -> list[JobOutput | None]:
        if not self.started:
            if self.out is not None and not self.resume:  # the engine has cleared its own files by now
                for name in ("flower_nodes.jsonl", "flower_traffic.jsonl", "flower_traffic_summary.json"):
                    (self.out / name).unlink(missing_ok=True)
            self.wait_for_nodes(rnd)
            self.started = True
        else:
            self.refresh(rnd)
        if rnd != self._rnd:
            self._rnd, self._calls = rnd, 0
        self._calls += 1
        bpp = self.cfg.fleet.bytes_per_param
        outputs: list[JobOutput | None] = [None] * len(jobs)
        rows: list[dict[str, Any]] = []
        todo: dict[int, tuple[State, str]] = {}  # job index -> (what the device will hold, tag)
        msgs: dict[int, Message] = {}
        for i, (plan, payload, k) in enumerate(jobs):
            keys = plan.downloaded(payload)
            rows.append({"round": rnd, "call": k, "device": plan.device, "node_id": self.nodes.get(plan.device),
                         "link": plan.link, "download": plan.download, "status": "ok",
                         "meter_down": num_bytes(payload, bpp, keys), "meter_up": 0,
                         "flower_down_tensor": 0, "flower_down_array": 0, "flower_down_wire": 0,
                         "flower_up_tensor": 0, "flower_up_array": 0, "flower_up_wire": 0, "device_received_wire": 0})
            if plan.device not in self.nodes:
                rows[i]["status"] = "no-node"
                continue
            msgs[i], todo[i] = self._message(rnd, plan, payload, k, keys, rows[i], full=False)

        t0 = time.monotonic()
        deadline = t0 + self.round_timeout
        for attempt in range(2):  # second pass: resend full payloads to devices that lost their copy
            if not msgs:
                break
            order = list(msgs)
            for i in order:
                self._count_down(rows[i], msgs[i])
            replies = list(self.grid.send_and_receive([msgs[i] for i in order],
                                                      timeout=max(1.0, deadline - time.monotonic())))
            by_id = {r.metadata.reply_to_message_id: r for r in replies}
            resend: dict[int, Message] = {}
            for i in order:
                plan, payload, k = jobs[i]
                r = by_id.get(msgs[i].metadata.message_id)
                if r is None:
                    rows[i]["status"] = "timeout"
                elif r.has_error():
                    rows[i]["status"] = f"error: {r.error.reason}"
                else:
                    status = wire.reply_status(r.content)
                    if status == wire.STALE_BASE and attempt == 0:
                        rows[i]["status"] = "resent-full"
                        resend[i], todo[i] = self._message(rnd, plan, payload, k, None, rows[i], full=True)
                        continue
                    if status is not None:
                        rows[i]["status"] = f"{status}: {r.content.config_records[wire.STATUS]['detail']}"
                        if status == wire.NOT_SET_UP:  # ask it again at the next call
                            self.known.pop(self.nodes.pop(plan.device, -1), None)
                    else:
                        outputs[i] = wire.output_from_reply(r.content)
                        self._count_up(rows[i], r.content, outputs[i])
                        self.held[plan.device] = todo[i]
                if outputs[i] is None:
                    self.held.pop(plan.device, None)
            msgs = resend
        wall = time.monotonic() - t0
        for i, row in enumerate(rows):
            row["wall_s"] = round(wall, 3)
            self._append("flower_traffic.jsonl", row)
            if outputs[i] is not None:
                tot = self.totals.setdefault(row["device"], {})
                for key, v in row.items():
                    if key.startswith(("meter_", "flower_", "device_")):
                        tot[key] = tot.get(key, 0) + v
        self._event(rnd, "train", call=self._calls, sent=[jobs[i][0].device for i in range(len(jobs)) if rows[i]["status"] != "no-node"],
                    ok=[jobs[i][0].device for i in range(len(jobs)) if outputs[i] is not None],
                    failed={str(jobs[i][0].device): rows[i]["status"] for i in range(len(jobs)) if outputs[i] is None},
                    wall_s=round(wall, 3))
        failed = {jobs[i][0].device: rows[i]["status"] for i in range(len(jobs)) if outputs[i] is None}
        if failed:
            self.log(f"[flower] round {rnd}: devices dropped {failed}")
        return outputs

    def _message(self, rnd: int, plan: DevicePlan, payload: State, k: int, keys: list[str] | None,
                 row: dict[str, Any], full: bool) -> tuple[Message, tuple[str, State]]:
        """The message for one job: only the trained layers + head when the device verifiably holds
        the frozen ones (`held` mirrors what each device keeps), else the whole payload."""
        send, base = payload, ""
        held = self.held.get(plan.device)
        if not full and plan.download == "trained" and held is not None and keys is not None:
            frozen = [key for key in payload if key not in set(keys)]
            if all(key in held[1] and held[1][key].shape == payload[key].shape and torch.equal(held[1][key], payload[key])
                   for key in frozen):
                send, base = {key: payload[key] for key in keys}, held[0]
        tag = f"r{rnd}.c{k}.d{plan.device}.{uuid.uuid4().hex[:8]}"
        content = wire.train_content(send, plan, rnd, k, tag, base, self.settings)
        msg = Message(content, dst_node_id=self.nodes[plan.device], message_type=wire.TRAIN, group_id=str(rnd),
                      ttl=self.round_timeout + 60)
        row["sent_keys"] = len(send)
        return msg, (tag, payload)

    @staticmethod
    def _count_down(row: dict[str, Any], msg: Message) -> None:
        rec = msg.content.array_records[wire.PAYLOAD]
        row["flower_down_tensor"] += wire.tensor_bytes(rec)
        row["flower_down_array"] += rec.count_bytes()
        row["flower_down_wire"] += wire.wire_bytes(msg.content)

    def _count_up(self, row: dict[str, Any], content, out: JobOutput) -> None:
        rec = content.array_records[wire.UPDATE]
        row["meter_up"] = num_bytes(out.update, self.cfg.fleet.bytes_per_param)
        row["flower_up_tensor"] = wire.tensor_bytes(rec)
        row["flower_up_array"] = rec.count_bytes()
        row["flower_up_wire"] = wire.wire_bytes(content)
        row["device_received_wire"] = int(content.metric_records[wire.METRICS]["received-bytes"])

    # -- the end of the run ------------------------------------------------------------------
    def evaluate(self, payload: State, ranks: dict[int, int], batches: list) -> tuple[float, float]:
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
            "nodes": {str(d): n for d, n in sorted(self.nodes.items())},
        }
