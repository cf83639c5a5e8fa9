"""Secure aggregation in process (`fleet.secure_aggregation`): the aggregators see only each
exchange's `Summed` updates, and a method whose rule needs each update is refused by name."""

from __future__ import annotations

import pytest
import torch

from hierfedlora.engine import Simulation
from hierfedlora.errors import ConfigError
from hierfedlora.protocol import DeviceJob, DevicePlan, JobOutput, Summed, plain_sums


def _run(cfg):
    sim = Simulation(cfg)
    rows = sim.run()
    return sim, rows


def _same_run(tiny_cfg, **kw):
    plain, plain_rows = _run(tiny_cfg(**kw))
    summed, summed_rows = _run(tiny_cfg(**kw, **{"fleet.secure_aggregation": True}))
    assert all(r.pop("secagg_alone") == [] for r in summed_rows[1:])  # every aggregator had company
    assert summed_rows == plain_rows  # metrics, bytes, simulated time: every value
    assert set(summed.state) == set(plain.state)
    for k in plain.state:  # the mean of the sum is the per-device FedAvg, bit for bit
        assert torch.equal(summed.state[k], plain.state[k]), k
    return summed


def test_fedlora_from_sums_equals_per_device_fedavg(tiny_cfg):
    _same_run(tiny_cfg, **{"run.rounds": 2, "fleet.num_devices": 3})


def test_hierfedlora_group_fedavg_from_sums_equals_per_device(tiny_cfg):
    sim = _same_run(tiny_cfg, **{"run.rounds": 1, "fleet.num_devices": 4, "method.name": "hierfedlora",
                                 "method.num_groups": 2, "method.taus": [2]})
    assert all(len(g) == 2 for g in sim.strategy.groups)


def test_plain_sum_is_the_weighted_mean():
    """mean = Σ n_k x_k / Σ n_k per aggregator, over the outputs that arrived (hand-computed)."""
    jobs = [DeviceJob(DevicePlan(d, {0: 1}, (0,), 1), {}, 0) for d in range(3)]
    outs = [JobOutput({"w": torch.tensor([1.0, 2.0])}, 0.0, 0.0, 1), JobOutput({"w": torch.tensor([4.0, 8.0])}, 0.0, 0.0, 3),
            None]
    sums = plain_sums(outs, jobs, [0, 0, 0])
    assert list(sums) == [0] and sums[0].weight == 4.0 and sums[0].devices == (0, 1)
    assert torch.allclose(sums[0].mean["w"], torch.tensor([13 / 4, 26 / 4]))
    base = {"w": torch.zeros(2), "other": torch.ones(1)}
    new = Summed(sums[0].mean, 4.0, (0, 1)).apply(base)
    assert torch.equal(new["other"], base["other"]) and torch.equal(new["w"], sums[0].mean["w"])


@pytest.mark.parametrize("method, reason", [
    ("hetlora", "per-device update norms"),
    ("flexlora", "full products ΔW_k"),
    ("legend", "per-slot averages"),
])
def test_a_method_that_needs_each_update_is_refused_with_its_reason(tiny_cfg, method, reason):
    with pytest.raises(ConfigError) as e:
        tiny_cfg(**{"method.name": method, "fleet.secure_aggregation": True})
    msg = str(e.value)
    assert f"method '{method}' cannot run under secure aggregation" in msg and reason in msg
    assert "fedlora" in msg  # it names the methods that can


def test_a_deadline_is_refused_under_secure_aggregation(tiny_cfg):
    with pytest.raises(ConfigError, match="already in the sum"):
        tiny_cfg(**{"fleet.secure_aggregation": True, "fleet.deadline_s": 10.0})


def test_the_only_device_of_an_aggregator_is_not_asked_and_the_run_goes_on(tiny_cfg):
    """3 devices in 2 groups: the group of one cannot hide its update in a sum, so its device gets
    no job (listed in `secagg_alone`, never a participant, no bytes), and the other group trains."""
    cfg = tiny_cfg(**{"run.rounds": 2, "fleet.num_devices": 3, "fleet.participation": 1.0, "method.name": "hierfedlora",
                      "method.num_groups": 2, "fleet.secure_aggregation": True})
    sim, rows = _run(cfg)
    (lone,) = [g[0] for g in sim.strategy.groups if len(g) == 1]
    for r in rows[1:]:
        assert r["secagg_alone"] == [lone] and lone not in r["participant_ids"] and r["participants"] == 2
    assert rows[-1]["bytes_up"] > 0 and "test_acc" in rows[-1]
