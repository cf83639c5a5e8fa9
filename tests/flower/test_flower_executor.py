"""FlowerExecutor (hierfedlora.flower.executor) through `LoopbackGrid`: any strategy gives the
engine's results, held copies for ``download="trained"``, resends, failures and the traffic rows."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from hierfedlora.aggregate import slot_average
from hierfedlora.engine import Simulation
from hierfedlora.flower.executor import TrafficRow
from hierfedlora.protocol import DevicePlan, Job, RoundReport
from hierfedlora.strategies import registry
from hierfedlora.strategies.base import StrategyBase, weighted_loss


# -- a strategy with HierFedLoRA's and LEGEND's message patterns ------------------------------
class TwoTierSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tau: int = 2


class TwoTier(StrategyBase):
    """Two groups; group k trains the top k+1 layers, each device at its own ranks there (rising
    toward the output, as LEGEND's); `tau` intra-group rounds over the LAN, the later ones
    downloading only the trained layers and head (HierFedLoRA's), then a global average."""

    def __init__(self, settings: TwoTierSettings, setup):
        self.tau, self.setup, self.L = settings.tau, setup, setup.layout.num_layers

    def global_ranks(self):
        return {l: self.setup.rank for l in range(self.L)}

    def plan(self, d: int, k: int, t: int) -> DevicePlan:
        R, L = self.setup.rank, self.L
        train = tuple(range(L - 1 - k, L))
        ranks = {l: (max(1, R - (L - 1 - l) - d % 2) if l in train else R) for l in range(L)}
        return DevicePlan(d, ranks, train, self.setup.local_steps, link="lan", download="all" if t == 0 else "trained")

    def run_round(self, rnd, state, ctx):
        groups = [g for g in (ctx.available[0::2], ctx.available[1::2]) if g]
        states, weights, results, time_s = [], [], [], 0.0
        for k, g in enumerate(groups):
            gstate, gtime = state, 0.0
            for t in range(self.tau):
                exchange = ctx.train([Job(self.plan(d, k, t), gstate) for d in g])
                res = exchange.results
                gtime += exchange.time_s()  # the waits for devices that failed count too
                if res:
                    gstate = slot_average(gstate, [r.update for r in res], [r.num_examples for r in res])
                results += res
            states.append(gstate)
            weights.append(sum(self.setup.num_examples[d] for d in g))
            time_s = max(time_s, gtime)
        if not results:
            return state, RoundReport(0.0, float("nan"), [])
        new = slot_average(state, states, weights)
        return new, RoundReport(time_s, weighted_loss(results), sorted({r.device for r in results}),
                                extra={"calls": len(groups) * self.tau})

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d):
        pass


@pytest.fixture
def two_tier(monkeypatch):
    entries = dict(registry.available())
    entries["twotier"] = registry.StrategyEntry("twotier", TwoTierSettings, TwoTier, __name__, {})
    monkeypatch.setattr(registry, "available", lambda: entries)


# -- tests -----------------------------------------------------------------------------------
def test_traffic_rows_keep_the_documented_keys():
    """flower_traffic.jsonl's keys (docs/flower.md), in order; a job never sent has no `sent_keys`."""
    row = TrafficRow(round=1, call=0, device=2, node_id=None, link="wan", download="all", status="no-node")
    keys = ["round", "call", "device", "node_id", "link", "download", "status", "meter_down", "meter_up",
            "flower_down_tensor", "flower_down_array", "flower_down_wire", "flower_up_tensor", "flower_up_array",
            "flower_up_wire", "device_received_wire"]
    assert list(row.to_json()) == keys + ["wall_s"]
    row.sent_keys = 3
    assert list(row.to_json()) == keys + ["sent_keys", "wall_s"]
    assert list(row.byte_counts()) == keys[7:]


def test_flower_executor_reproduces_the_engine(tiny_cfg, flower_sim, loopback_grid, read_jsonl, same_rows):
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 3})
    local = Simulation(cfg).run()
    grid = loopback_grid([0, 1, 2])
    sim, out = flower_sim(cfg, grid)
    same_rows(local, sim.run(), tol=1e-6)
    traffic = read_jsonl(out / "flower_traffic.jsonl")
    assert len(traffic) == 2 * 3 and all(r["status"] == "ok" for r in traffic)
    # the tensors Flower carried are exactly what the meter booked (float32 = bytes_per_param 4)
    assert all(r["flower_down_tensor"] == r["meter_down"] and r["flower_up_tensor"] == r["meter_up"] for r in traffic)
    assert all(r["flower_down_wire"] > r["flower_down_tensor"] for r in traffic)  # npy headers, names, plan
    events = read_jsonl(out / "flower_nodes.jsonl")
    assert {e["device"]: e["node_id"] for e in events if e["event"] == "joined"} == {0: 1000, 1: 1001, 2: 1002}


@pytest.mark.parametrize("method", sorted(registry.available()))
def test_every_registered_strategy_runs_unchanged_through_flower(tiny_cfg, flower_sim, loopback_grid, read_jsonl,
                                                                 same_rows, method):
    """Any strategy module (LEGEND's per-device depths and ranks, HierFedLoRA's intra-group rounds,
    HetLoRA's regulariser option, ...) gives the engine's results when its devices are SuperNodes."""
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 4, "method.name": method})
    local = Simulation(cfg).run()
    sim, out = flower_sim(cfg, loopback_grid([0, 1, 2, 3]))
    same_rows(local, sim.run(), tol=1e-6)
    traffic = read_jsonl(out / "flower_traffic.jsonl")
    assert traffic and all(r["status"] == "ok" and r["flower_down_tensor"] == r["meter_down"] for r in traffic)


@pytest.mark.parametrize("method", ["fedlora", "hierfedlora"])
def test_causal_lm_instruction_tuning_through_flower(tiny_llm_cfg, flower_sim, loopback_grid, same_rows, method):
    """The LLM task's devices as SuperNodes (response masks travel with their data) give the engine's
    metrics, generative evaluation included."""
    extra = {"method.num_groups": 2, "method.taus": [1, 2]} if method == "hierfedlora" else {}
    cfg = tiny_llm_cfg(**{"run.rounds": 2, "fleet.num_devices": 4, "method.name": method, **extra})
    local = Simulation(cfg).run()
    sim, _ = flower_sim(cfg, loopback_grid([0, 1, 2, 3]))
    rows = sim.run()
    same_rows(local, rows, tol=1e-6)
    assert "test_exact_match" in rows[-1]


def test_intra_group_rounds_and_per_device_ranks(tiny_cfg, flower_sim, loopback_grid, read_jsonl, same_rows, two_tier):
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 4, "method.name": "twotier"})
    local = Simulation(cfg).run()
    sim, out = flower_sim(cfg, loopback_grid([0, 1, 2, 3]))
    same_rows(local, sim.run(), tol=1e-6)
    traffic = read_jsonl(out / "flower_traffic.jsonl")
    assert len(traffic) == 2 * 2 * 4  # rounds x tau x devices
    later = [r for r in traffic if r["download"] == "trained"]
    first = {(r["round"], r["device"]): r for r in traffic if r["download"] == "all"}
    assert later and all(r["status"] == "ok" and r["flower_down_tensor"] == r["meter_down"] for r in later)
    # only the trained layers and the head travel once the device holds the frozen layers
    assert all(r["flower_down_tensor"] < first[(r["round"], r["device"])]["flower_down_tensor"] for r in later
               if r["device"] % 2 == 0)


def test_device_that_lost_its_copy_gets_the_full_payload(tiny_cfg, flower_sim, loopback_grid, read_jsonl, same_rows,
                                                         two_tier):
    cfg = tiny_cfg(**{"run.rounds": 1, "fleet.num_devices": 4, "method.name": "twotier"})
    local = Simulation(cfg).run()
    sim, out = flower_sim(cfg, loopback_grid([0, 1, 2, 3], forget={2}))
    same_rows(local, sim.run(), tol=1e-6)
    resent = [r for r in read_jsonl(out / "flower_traffic.jsonl") if r["status"] == "resent-full"]
    assert [r["device"] for r in resent] == [2]
    assert resent[0]["flower_down_tensor"] > resent[0]["meter_down"]  # both attempts really crossed the wire


def test_failed_devices_are_dropped_and_recorded(tiny_cfg, flower_sim, loopback_grid, read_jsonl):
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 4})
    grid = loopback_grid([0, 1, 3], silent={1}, crash={3})  # no node plays device 2
    sim, out = flower_sim(cfg, grid)
    rows = sim.run()
    assert [r["participant_ids"] for r in rows[1:]] == [[0], [0]]
    assert [r["dropped"] for r in rows[1:]] == [[1, 2, 3], [1, 2, 3]]
    status = {r["device"]: r["status"] for r in read_jsonl(out / "flower_traffic.jsonl") if r["round"] == 1}
    assert status[0] == "ok" and status[1] == "timeout" and status[2] == "no-node" and status[3].startswith("error")
    start = next(e for e in read_jsonl(out / "flower_nodes.jsonl") if e["event"] == "start")
    assert start["missing"] == [2]
