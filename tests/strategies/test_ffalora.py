"""ffalora, FFA-LoRA: A frozen at its shared initialisation on every device, B (+ head) trained and
FedAvg'd; only B and the head cross the wire once a device holds A."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hierfedlora.clock import ModelCost
from hierfedlora.device.train import DeviceData, run_job
from hierfedlora.engine import Simulation
from hierfedlora.fast.joined import JoinedExecutor
from hierfedlora.lora_state import delta_w, lora_key, to_device
from hierfedlora.protocol import DeviceJob, DevicePlan, Layout, LocalTraining, SetupInfo, TrainResult
from hierfedlora.strategies import ffalora

FFA = {"method.name": "ffalora", "run.rounds": 2}


def _setup(layout: Layout, rank: int) -> SetupInfo:
    """The little a strategy reads of the setup here (layers, rank, steps)."""
    return SetupInfo(layout=layout, profiles=[], num_examples=[], label_hists=np.zeros((0, 2)), mean_seq_len=[],
                     cost=ModelCost(hidden=3, intermediate=6), rank=rank, alpha=2.0, local_steps=3, batch_size=4,
                     bytes_per_param=4, backward_ratio=2.0, aggregator="ps", seed=0)


def _result(device: int, update: dict, n: int) -> TrainResult:
    return TrainResult(device, update, n, 0.5, 1.0, 0.1, 0.1, 0, 0)


def test_server_b_is_the_weighted_mean_and_a_stays_at_its_initialisation():
    layout = Layout(1, {"q": (3, 2)}, {"head.c.bias": (2,)})
    s = ffalora.Strategy(ffalora.Settings(), _setup(layout, 2))
    a0 = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])  # A [r=2, in=3]
    state = {"0.q.A": a0.clone(), "0.q.B": torch.zeros(2, 2), "head.c.bias": torch.zeros(2)}
    b1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b2 = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    # devices send B and the head only (their plans freeze A), with 10 and 30 examples
    results = [_result(0, {"0.q.B": b1, "head.c.bias": torch.tensor([1.0, 1.0])}, 10),
               _result(1, {"0.q.B": b2, "head.c.bias": torch.tensor([5.0, -3.0])}, 30)]
    new, _ = s.aggregate(state, results, {})
    # (10·b1 + 30·b2) / 40 = [[4, 5], [6, 7]];  head (10·1 + 30·5)/40 = 4, (10·1 − 30·3)/40 = −2
    assert torch.equal(new["0.q.B"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(new["head.c.bias"], torch.tensor([4.0, -2.0]))
    assert torch.equal(new["0.q.A"], a0)
    # with one A everywhere, mean_k(B_k)·A = mean_k(B_k·A): the server's ΔW is the mean of the devices'
    dev = [delta_w({"0.q.A": a0, "0.q.B": b}, 0, "q", 2.0, 2) for b in (b1, b2)]
    assert torch.allclose(delta_w(new, 0, "q", 2.0, 2), (10 * dev[0] + 30 * dev[1]) / 40)


def test_plans_freeze_a_and_download_it_only_the_first_time():
    layout = Layout(2, {"q": (3, 2)}, {"head.c.bias": (2,)})
    s = ffalora.Strategy(ffalora.Settings(), _setup(layout, 2))
    first, _ = s.plan(1, SimpleNamespace(available=[0, 2]))
    second, _ = s.plan(2, SimpleNamespace(available=[1, 2]))
    assert [(p.device, p.download, p.frozen_factors, p.train_layers) for p in first + second] == [
        (0, "all", ("A",), (0, 1)), (2, "all", ("A",), (0, 1)), (1, "all", ("A",), (0, 1)), (2, "trained", ("A",), (0, 1))]
    payload = {"0.q.A": 0, "0.q.B": 0, "1.q.A": 0, "1.q.B": 0, "head.c.bias": 0}
    assert second[1].uploaded(payload) == second[1].downloaded(payload) == ["0.q.B", "1.q.B", "head.c.bias"]
    assert first[0].downloaded(payload) == list(payload)
    resumed = ffalora.Strategy(ffalora.Settings(), _setup(layout, 2))
    resumed.load_state_dict(s.state_dict())
    assert resumed.holds_a == {0, 1, 2}
    with pytest.raises(ValueError, match="frozen_factors"):
        DevicePlan(0, {0: 2}, (0,), 1, frozen_factors=("C",))


def test_a_run_keeps_every_a_bit_identical_while_b_trains(tiny_cfg):
    sim = Simulation(tiny_cfg(**FFA))
    start = {k: v.clone() for k, v in sim.state.items()}
    init = sim.model.init_state(sim.global_ranks)
    sim.run()
    a_keys = [k for k in start if k.endswith(".A")]
    b_keys = [k for k in start if k.endswith(".B")]
    assert len(a_keys) == len(b_keys) == 4 * 2  # 4 layers × (query, value)
    assert all(torch.equal(sim.state[k], start[k]) and torch.equal(start[k], init[k]) for k in a_keys)
    assert all(not torch.equal(sim.state[k], start[k]) for k in b_keys)  # B starts at 0 and moved
    assert not torch.equal(sim.state["head.classifier.weight"], start["head.classifier.weight"])


def test_a_device_uploads_exactly_b_and_the_head(tiny_cfg):
    cfg = tiny_cfg(**FFA)
    assert cfg.fleet.bytes_per_param == 4
    sim = Simulation(cfg)
    seen = []
    aggregate = sim.strategy.aggregate
    sim.strategy.aggregate = lambda state, results, plans: (seen.append(results), aggregate(state, results, plans))[1]
    rows = sim.run()
    # tiny-bert: 4 layers, LoRA on query and value (32 → 32), rank 4; head 2×32 weight + 2 bias
    b_params = 4 * 2 * 32 * 4  # B [32, 4] per module = 1024
    a_params = 4 * 2 * 4 * 32  # A [4, 32] per module = 1024
    head = 2 * 32 + 2
    up = (b_params + head) * 4  # 4360 bytes, vs FedLoRA's (a + b + head)·4 = 8456
    assert [len(r) for r in seen] == [4, 4]
    assert all(r.bytes_up == up for rs in seen for r in rs)
    assert all(set(r.update) == {k for k in sim.state if not k.endswith(".A")} for rs in seen for r in rs)
    # the first download is everything (A too); after it, only B and the head
    assert [r.bytes_down for r in seen[0]] == [(a_params + b_params + head) * 4] * 4
    assert [r.bytes_down for r in seen[1]] == [up] * 4
    assert [(r["bytes_up"], r["bytes_down"]) for r in rows[1:]] == [(4 * up, 4 * 8456), (8 * up, 4 * 8456 + 4 * up)]


def test_frozen_a_gives_the_same_run_one_device_at_a_time_and_joined(tiny_cfg):
    common = {**FFA, "train.batch_size": 16}
    alone = Simulation(tiny_cfg(**common, **{"train.lockstep": 1}))
    joined = Simulation(tiny_cfg(**common, **{"train.lockstep": 4}))
    assert isinstance(joined.executor, JoinedExecutor) and not isinstance(alone.executor, JoinedExecutor)
    plans = [DevicePlan(d, joined.global_ranks, tuple(range(4)), 2, frozen_factors=("A",)) for d in range(4)]
    jobs = [DeviceJob(p, to_device(joined.state, p.ranks, joined.global_ranks), 0) for p in plans]
    assert joined.executor.groups(jobs) == [[0, 1, 2, 3]]  # the four devices really train joined
    both = DeviceJob(DevicePlan(2, joined.global_ranks, tuple(range(4)), 2), jobs[2].payload, 0)
    assert joined.executor.groups([jobs[0], jobs[1], both, jobs[3]]) == [[0, 1], [2], [3]]  # A frozen or not: apart
    assert alone.run() == joined.run()
    assert all(torch.equal(alone.state[k], joined.state[k]) for k in alone.state)


def test_frozen_a_job_on_the_packed_forward_matches_the_plain_forward(tiny_cfg):
    sim = Simulation(tiny_cfg(**FFA))
    m, w = sim.model, sim.work
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k.endswith(".B") else v for k, v in sim.state.items()}
    plan = DevicePlan(0, sim.global_ranks, tuple(range(4)), 3, frozen_factors=("A",))
    job = DeviceJob(plan, to_device(state, plan.ranks, sim.global_ranks), 0)
    data = DeviceData(w.ids, w.labels, w.parts[0], w.pad_id)
    settings = LocalTraining(seed=0, batch_size=8, lr=2e-2, weight_decay=0.01, backward_ratio=1.0)
    assert m.packed is not None
    fast = run_job(m, data, job, 1, settings)
    packed, m.packed = m.packed, None  # the plain transformers forward
    try:
        plain = run_job(m, data, job, 1, settings)
    finally:
        m.packed = packed
    assert fast.update.keys() == plain.update.keys() == {k for k in state if not k.endswith(".A")}
    # A stayed exactly where it was loaded on the device, on both paths
    for (layer, sub), (a, _) in m.factors().items():
        assert torch.equal(a.detach()[:4].cpu(), job.payload[lora_key(layer, sub, "A")])
    # float noise only (summation order); a wrong mask or a trained A would be ~0.1 to 1
    err = sum(float((fast.update[k] - plain.update[k]).norm()) ** 2 for k in plain.update) ** 0.5
    moved = sum(float((plain.update[k] - job.payload[k]).norm()) ** 2 for k in plain.update) ** 0.5
    assert moved > 0.05 and err <= 1e-3 * moved
    assert abs(fast.train_loss - plain.train_loss) < 1e-5
