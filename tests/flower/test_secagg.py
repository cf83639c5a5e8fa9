"""Secure aggregation through Flower's SecAgg+ (`flower.secagg`): the server gets each aggregator's
mean from masked updates, equal to the plain run's FedAvg within the quantisation's error."""

from __future__ import annotations

import math

import pytest
import torch

from hierfedlora.engine import Simulation

# SecAgg+ quantises each weighted entry to 2c/Q (c = 4, Q = 2^30): one exchange's mean is off by
# < 3e-8 per entry; local training (Adam) from the slightly different model widens that by round 2
ATOL = 1e-4


def _close_rows(a: list[dict], b: list[dict], tol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k, va in ra.items():
            if isinstance(va, float):
                assert math.isclose(va, rb[k], rel_tol=tol, abs_tol=tol), (k, ra["round"], va, rb[k])
            else:
                assert va == rb[k], (k, ra["round"], va, rb[k])


def test_fedlora_under_secagg_equals_the_plain_run(tiny_cfg, loopback_grid, flower_sim, read_jsonl):
    kw = {"run.rounds": 2, "fleet.num_devices": 3}
    plain = Simulation(tiny_cfg(**kw))
    plain_rows = plain.run()
    sim, out = flower_sim(tiny_cfg(**kw, **{"fleet.secure_aggregation": True}), loopback_grid([0, 1, 2]))
    rows = sim.run()
    assert all(r.pop("secagg_alone") == [] for r in rows[1:])  # no aggregator was left with one device
    _close_rows(rows, plain_rows)
    for k, v in plain.state.items():
        assert torch.allclose(sim.state[k], v, rtol=0, atol=ATOL), (k, float((sim.state[k] - v).abs().max()))
    traffic = read_jsonl(out / "flower_traffic.jsonl")
    assert len(traffic) == 6 and all(r["status"] == "ok" for r in traffic)
    for r in traffic:  # the masked update (int64 entries) is what went up; the key stages both ways
        assert r["flower_up_tensor"] > r["meter_up"] and r["flower_secagg_down_wire"] > 0 and r["flower_secagg_up_wire"] > 0
        assert r["flower_up_array"] == 0  # no tensor in the clear


def test_a_device_whose_update_exceeds_the_clip_fails_its_job(tiny_cfg, loopback_grid, flower_sim, read_jsonl):
    from hierfedlora.flower.run_config import SecAggOptions

    cfg = tiny_cfg(**{"run.rounds": 1, "fleet.num_devices": 3, "fleet.secure_aggregation": True})
    sim, out = flower_sim(cfg, loopback_grid([0, 1, 2]), secagg=SecAggOptions(clip=1e-4))
    sim.run()
    traffic = read_jsonl(out / "flower_traffic.jsonl")
    assert all("exceeds secagg-clip" in r["status"] for r in traffic)
    assert sim.rows[-1]["participants"] == 0
