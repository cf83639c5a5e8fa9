"""Shared set-up of the Flower adapter's tests (hierfedlora.flower): same results as the in-process
engine, faults, TLS.

Two layers of tests:
- in-process, through `LoopbackGrid` (a stand-in Grid that hands each message to our ClientApp in
  this process, with a Context per node): the wire format, the executor's node mapping, held copies
  for ``download="trained"``, resends and failures, for any strategy — fast;
- real processes on 127.0.0.1 (`LocalFederation`: flower-superlink + flower-supernode per device,
  `flwr run`; test_deploy.py): the same final metrics as the engine for FedLoRA (over TLS with
  SuperNode authentication) and HierFedLoRA, and a SuperNode killed mid-run. Every process a test
  starts is stopped in a finaliser, pass or fail. Deselect them with ``-m "not flower_processes"``.

Helpers shared by several test files are fixtures here (`read_jsonl`, `same_rows`, `loopback_grid`,
`flower_sim`): test files do not import from a conftest.
"""

from __future__ import annotations

import json
import math
import uuid

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402

from hierfedlora.engine import Simulation, local_executor  # noqa: E402
from hierfedlora.flower import client_app  # noqa: E402
from hierfedlora.flower import messages as wire  # noqa: E402
from hierfedlora.flower.executor import FlowerExecutor  # noqa: E402


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _same_rows(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb), (ra, rb)
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                assert math.isclose(va, vb, rel_tol=tol, abs_tol=tol), (k, ra["round"], va, vb)
            else:
                assert va == vb, (k, ra["round"], va, vb)


@pytest.fixture
def read_jsonl():
    """The rows of a JSON-lines file."""
    return _read_jsonl


@pytest.fixture
def same_rows():
    """Assert two runs' metrics rows are equal (floats to `tol`)."""
    return _same_rows


# -- an in-process Grid ----------------------------------------------------------------------
@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages take their sender's run and node ids from the process's task identity, which
    Flower sets in a ServerApp process; the in-process tests play that process."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _own_copy(m: Message) -> Message:
    """The message with its own config records, as a node receives it over the wire: SecAgg+ sends
    one content object to every node, and its ClientApp mod edits the records it gets."""
    m.content = RecordDict({k: ConfigRecord(dict(v)) if isinstance(v, ConfigRecord) else v for k, v in m.content.items()})
    return m


class LoopbackGrid:
    """Delivers each message to `client_app.app` in this process; one Context per node.

    `silent` devices never answer (a dead or hung node), `crash` devices raise inside the ClientApp
    (Flower turns that into an error reply), `forget` devices lose their context state after each
    message (a restarted process with no memory)."""

    def __init__(self, partitions: list[int], silent=(), crash=(), forget=()):
        self.contexts = {1000 + p: Context(run_id=1, node_id=1000 + p, node_config={"partition-id": p},
                                           state=RecordDict(), run_config={}) for p in partitions}
        self.silent, self.crash, self.forget = set(silent), set(crash), set(forget)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            nid = m.metadata.dst_node_id
            ctx = self.contexts[nid]
            p = int(ctx.node_config["partition-id"])
            if p in self.silent and m.metadata.message_type == wire.TRAIN:
                continue
            try:
                if p in self.crash and m.metadata.message_type == wire.TRAIN:
                    raise RuntimeError("device crashed")
                r = client_app.app(_own_copy(m), ctx)
            except Exception as e:  # noqa: BLE001 - as Flower's ClientApp runner does
                r = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            if p in self.forget:
                ctx.state = RecordDict({k: v for k, v in ctx.state.items() if k != client_app.HELD})
            replies.append(r)
        return replies


@pytest.fixture
def loopback_grid():
    """`LoopbackGrid(partitions, silent=, crash=, forget=)`."""
    return LoopbackGrid


@pytest.fixture
def flower_sim(tmp_path):
    """Factory: (Simulation whose devices are the grid's nodes, its run directory)."""

    def make(cfg, grid, **kw):
        out = tmp_path / "flower"
        out.mkdir(exist_ok=True)

        def executor(sim):
            return FlowerExecutor(grid, cfg, out, local_executor(sim), round_timeout=5, node_wait=0, query_timeout=5,
                                  log=lambda *_: None, **kw)

        return Simulation(cfg, out, executor=executor), out

    return make
