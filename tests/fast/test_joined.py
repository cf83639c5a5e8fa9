"""Devices trained together (joined batches) get exactly what each gets alone."""

import pytest
import torch

from fast_helpers import TOPK, tiny_model
from hierfedlora.device.train import DeviceData
from hierfedlora.engine import Simulation
from hierfedlora.lora_state import to_device
from hierfedlora.protocol import DeviceJob, DevicePlan, LocalTraining


@pytest.mark.parametrize("method,below", [(TOPK, False),  # top layers, the cache below them
                                          (TOPK, True),  # device 1's LoRA below the cache is not zero
                                          ({"method.name": "fedlora", "model.lora_dropout": 0.1}, False)])  # all, LoRA dropout


def test_devices_trained_together_get_exactly_what_they_get_alone(tiny_cfg, method, below):
    from hierfedlora.lora_state import layer_of
    from hierfedlora.fast.joined import joined_groups, run_jobs

    sim = Simulation(tiny_cfg(**method, **{"train.batch_size": 16, "train.local_steps": 3}))
    m, w = sim.model, sim.work
    layers = tuple(sorted(sim.strategy.layers)) if hasattr(sim.strategy, "layers") else tuple(range(m.num_layers))
    ranks = {l: 4 for l in range(m.num_layers)}  # LoRA everywhere, zero where nothing trains
    start = m.init_state(ranks)
    g = torch.Generator().manual_seed(1)
    jobs = []
    for d in range(4):  # each device from its own state (as after some training), so their factors differ
        moved = [k for k in start if layer_of(k) is None or layer_of(k) in layers or (below and d == 1)]
        state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k in moved else v for k, v in start.items()}
        plan = DevicePlan(d, ranks, layers, 3)
        jobs.append((DeviceData(w.ids, w.labels, w.parts[d], w.pad_id), DeviceJob(plan, to_device(state, ranks, ranks), 0)))
    kw = dict(seed=0, batch_size=16, lr=2e-2, weight_decay=0.01, backward_ratio=1.0)
    assert joined_groups(m, [j.plan for _, j in jobs[:3]], [len(d.positions) for d, _ in jobs], 16, 3) == [[0, 1, 2]]
    three, one = LocalTraining(**kw, lockstep=3), LocalTraining(**kw)
    together = run_jobs(m, jobs[:3], 1, three) + run_jobs(m, jobs[3:], 1, three)
    alone = [run_jobs(m, [j], 1, one)[0] for j in jobs]
    for a, t in zip(alone, together):
        assert a.train_loss == t.train_loss and a.flops == t.flops
        assert a.update.keys() == t.update.keys()
        assert all(torch.equal(a.update[k], t.update[k]) for k in a.update), [k for k in a.update if not torch.equal(a.update[k], t.update[k])]
    assert not torch.equal(alone[0].update["head.classifier.weight"], alone[1].update["head.classifier.weight"])
    if method is TOPK:
        assert m.prefix is not None and len(m.prefix.store) > 0  # the cached path ran


def test_only_jobs_of_one_plan_shape_train_together():
    from hierfedlora.fast.joined import joined_groups

    m = tiny_model()
    r = {l: 4 for l in range(4)}
    plans = [DevicePlan(0, r, (2, 3), 3), DevicePlan(1, r, (2, 3), 3), DevicePlan(2, r, (3,), 3),
             DevicePlan(3, r, (3,), 3), DevicePlan(4, r, (3,), 2), DevicePlan(5, r, (3,), 2, options={"mu": 0.1})]
    assert joined_groups(m, plans, [40] * 6, 16, 4) == [[0, 1], [2, 3], [4], [5]]
    assert joined_groups(m, plans[:4], [40, 40, 40, 12], 16, 4) == [[0, 1], [2], [3]]  # a batch under MIN_ROWS
    assert joined_groups(m, plans[:2], [40, 40], 16, 1) == [[0], [1]]
    ten = [DevicePlan(i, r, (3,), 3) for i in range(10)]
    assert joined_groups(m, ten, [40] * 10, 16, 8) == [list(range(5)), list(range(5, 10))]  # even, not 8 + 2
    assert joined_groups(m, ten[:7], [40] * 7, 16, 3) == [[0, 1], [2, 3], [4, 5, 6]]
