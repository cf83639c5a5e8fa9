"""Dropouts and the round deadline (design.md §3): an aggregator waits for a device that dropped out
(until `fleet.deadline_s`, or as long as its job would have taken), a straggler's late update is
discarded and the exchange lasts exactly the deadline; one mechanism (`Exchange.time_s`) for the
one-shot methods and HierFedLoRA's groups alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierfedlora.engine import Simulation
from hierfedlora.fleet import EDGE_AGGREGATOR, MBIT, DeviceProfile
from hierfedlora.lora_state import head_and_layers
from hierfedlora.protocol import Exchange, Job, JobOutput, Missed, Scores, TrainResult

# tiny-bert, rank 4 in all 4 layers + the head (tests/test_engine.py): what every plan here moves
B = (4 * 512 + 66) * 4
# round numbers for the clock: FLOP/s, WAN 1 MB/s up, 2 MB/s down, 0.1 s; LAN 10 MB/s, 0.01 s
FAST = DeviceProfile("test", flops=1e9, memory_gb=100.0, wan_up_Bps=1e6, wan_down_Bps=2e6, wan_latency_s=0.1,
                     lan_up_Bps=1e7, lan_down_Bps=1e7, lan_latency_s=0.01)
WAN_DOWN, WAN_UP = 0.1 + B / 2e6, 0.1 + B / 1e6
LAN = 0.01 + B / 1e7


class StubExecutor:
    """Devices that do not train: each returns its device number in every uploaded tensor, 10
    examples, and the FLOPs `flops[device]` (so compute takes flops / 1e9 s on `FAST`)."""

    def __init__(self, flops: dict[int, float]):
        self.flops = flops

    def run(self, rnd, jobs):
        return [JobOutput({k: torch.full_like(j.payload[k], float(j.plan.device))
                           for k in head_and_layers(j.payload, j.plan.train_layers)}, 1.0, self.flops[j.plan.device], 10)
                for j in jobs]

    def evaluate(self, payload, ranks, batches):
        return Scores.of_classes(1.0, np.array([[1, 1], [0, 2]]))  # loss 1, accuracy 3/4

    def close(self):
        pass


def simulation(tiny_cfg, flops, drops=(), profiles=None, **overrides) -> Simulation:
    """A simulation of len(flops) devices on the stub executor whose rounds see `profiles` (default
    all `FAST`) and drop `drops`."""
    n = len(flops)
    sim = Simulation(tiny_cfg(**{"fleet.num_devices": n, "fleet.name": "uniform", **overrides}),
                     executor=lambda s: StubExecutor(flops))
    make = sim._context

    def context(rnd):
        ctx = make(rnd)
        ctx.profiles, ctx.drops = list(profiles or [FAST] * n), set(drops)
        return ctx

    sim._context = context
    return sim


def one_exchange(sim: Simulation):
    ctx = sim._context(1)
    plans, _ = sim.strategy.plan(1, ctx)
    return ctx, ctx.train([Job(p, sim.state) for p in plans])


def test_exchange_time_is_the_last_arrival_or_the_longest_wait():
    r = lambda d, t: TrainResult(d, {}, 1, 0.0, t, 0.0, 0.0, 0, 0)
    ex = Exchange([r(0, 1.0), r(1, 3.0)], [Missed(2, "dropped", 5.0, 10), Missed(3, "straggler", 2.0, 10, 10)])
    assert ex.time_s() == 5.0
    assert ex.time_s([0, 1]) == 3.0 and ex.time_s([0, 3]) == 2.0 and ex.time_s([7]) == 0.0
    assert Exchange([]).time_s() == 0.0


def test_a_dropped_device_is_waited_for_as_long_as_its_job_would_take(tiny_cfg):
    slow = DeviceProfile("slow", flops=1e4, memory_gb=100.0, wan_up_Bps=1e6, wan_down_Bps=2e6, wan_latency_s=0.1)
    sim = simulation(tiny_cfg, {0: 1e9, 1: 2e9, 2: 3e9}, drops={2}, profiles=[FAST, FAST, slow])
    ctx, ex = one_exchange(sim)
    assert [r.device for r in ex.results] == [0, 1] and ctx.dropped == {2}
    # predicted compute: E·b·(L + ratio·L)·(2n(4h² + 2hi) + 4n²h) / F, at its mean example length n
    n, b, h, i = round(sim.setup.mean_seq_len[2]), 8, 32, 64
    compute = 2 * b * (4 + 4) * (2 * n * (4 * h * h + 2 * h * i) + 4 * n * n * h) / 1e4
    wait = WAN_DOWN + compute + WAN_UP
    assert ex.missed == [Missed(2, "dropped", pytest.approx(wait, rel=1e-12), B, 0)]
    assert ex.time_s() == pytest.approx(wait, rel=1e-12) and wait > WAN_DOWN + 2.0 + WAN_UP  # longer than device 1
    assert sim.meter.down["wan"] == 3 * B and sim.meter.up["wan"] == 2 * B  # it downloaded, sent nothing


def test_with_a_deadline_a_dropped_device_is_waited_for_until_it(tiny_cfg):
    sim = simulation(tiny_cfg, {0: 1e9, 1: 2e9, 2: 3e9}, drops={0}, **{"fleet.deadline_s": 10.0})
    ctx, ex = one_exchange(sim)
    assert [r.time_s for r in ex.results] == pytest.approx([WAN_DOWN + 2.0 + WAN_UP, WAN_DOWN + 3.0 + WAN_UP])
    assert ex.missed == [Missed(0, "dropped", 10.0, B, 0)] and ex.time_s() == 10.0
    assert sim.meter.down["wan"] == 3 * B and sim.meter.up["wan"] == 2 * B


def test_a_straggler_is_not_aggregated_and_the_round_lasts_the_deadline(tiny_cfg):
    # jobs take 1.2127, 2.2127 and 3.2127 s: device 2 misses the 3 s deadline
    sim = simulation(tiny_cfg, {0: 1e9, 1: 2e9, 2: 3e9}, **{"fleet.deadline_s": 3.0})
    row = sim.step()
    assert row["round_time_s"] == 3.0 and row["stragglers"] == [2] and row["dropped"] == []
    assert row["participant_ids"] == [0, 1]
    assert all(torch.all(v == 0.5) for v in sim.state.values())  # (0·10 + 1·10)/20; with device 2: 1.0
    assert row["bytes_down"] == 3 * B and row["bytes_up"] == 3 * B  # its late update still crossed the link


def test_without_a_deadline_the_row_has_no_stragglers_key(tiny_cfg):
    row = simulation(tiny_cfg, {0: 1e9, 1: 2e9}).step()
    assert "stragglers" not in row and row["round_time_s"] == WAN_DOWN + 2.0 + WAN_UP


def test_a_deadline_no_device_meets_keeps_the_model_and_lasts_the_deadline(tiny_cfg):
    sim = simulation(tiny_cfg, {0: 1e9, 1: 2e9, 2: 3e9}, **{"fleet.deadline_s": 0.5})
    before = {k: v.clone() for k, v in sim.state.items()}
    with pytest.warns(UserWarning, match=r"fleet.deadline_s = 0.5 s"):
        row = sim.step()
    assert row["round_time_s"] == 0.5 and row["stragglers"] == [0, 1, 2] and row["participants"] == 0
    assert row["train_loss"] is None and all(torch.equal(before[k], sim.state[k]) for k in before)


def test_hierfedlora_charges_the_wait_inside_its_group(tiny_cfg):
    """Two groups at edge aggregators, τ = 2: the group with the dropped member waits the deadline
    in its first intra-group round; the member is gone for the second (nothing sent, no wait)."""
    method = {"method.name": "hierfedlora", "method.num_groups": 2, "method.fixed_depth": 4, "method.fixed_tau": 2}
    drops: set[int] = set()
    sim = simulation(tiny_cfg, {d: 1e9 for d in range(4)}, drops=drops, **{"fleet.deadline_s": 10.0, **method})
    gone = sim.strategy.groups[0][0]
    drops.add(gone)  # read when the round's context is made
    row = sim.step()
    member = LAN + 1.0 + LAN  # LAN download, 1 s of compute, LAN upload; later rounds download the same B
    edge = (0.02 + B / (50 * MBIT)) * 2  # PS -> edge aggregator (whole model), edge -> PS (all layers trained)
    times = {g["group"]: g["time_s"] for g in row["groups"]}
    assert times[0] == pytest.approx(edge + 10.0 + member, rel=1e-12)
    assert times[1] == pytest.approx(edge + 2 * member, rel=1e-12)
    assert row["round_time_s"] == times[0] and row["dropped"] == [gone] and row["stragglers"] == []
    # LAN: 4 + 3 downloads, 3 + 3 uploads; WAN: each edge aggregator's model down and up
    assert sim.meter.down["lan"] == 7 * B and sim.meter.up["lan"] == 6 * B
    assert sim.meter.down["wan"] == sim.meter.up["wan"] == 2 * B
    assert EDGE_AGGREGATOR.wan_up_Bps == EDGE_AGGREGATOR.wan_down_Bps == 50 * MBIT
