import json
import math

import numpy as np
import pytest
import torch

from hierfedlora.aggregate import delta_norms, zero_pad_average
from hierfedlora.cli import main
from hierfedlora.experiment import run_experiment
from hierfedlora.engine import Simulation
from hierfedlora.experiment import prepare_run_dir
from hierfedlora.fleet import build_fleet
from hierfedlora.lora_state import delta_w, from_device, to_device
from hierfedlora.strategies import hetlora
from hierfedlora.protocol import DevicePlan, Exchange, TrainResult
from hierfedlora.protocol import LocalTraining
from hierfedlora.strategies.registry import trainer_options
from hierfedlora.device.train import local_train

ALPHA = 8.0


def test_capacity_ranks_are_log_linear_between_bounds():
    # log(c/c_min)/log(c_max/c_min) = 0, 1/2, 1 for capacities 1, 4, 16 -> 2 + 6·(0, .5, 1)
    assert hetlora.capacity_ranks([1.0, 4.0, 16.0, 2.0], 2, 8) == [2, 5, 8, 2 + round(6 * 0.25)]
    assert hetlora.capacity_ranks([3.0, 3.0], 1, 4) == [4, 4]


def test_ranks_follow_capacity_on_jetson80(tiny_cfg):
    sim_setup = Simulation(tiny_cfg(**{"method.name": "hetlora", "method.rank_min": 1, "method.capacity": "flops",
                                       "fleet.num_devices": 8})).setup
    s = hetlora.Strategy(hetlora.Settings(rank_min=1, capacity="flops"), sim_setup)
    flops = [p.flops for p in sim_setup.profiles]
    assert min(s.ranks) == 1 and max(s.ranks) == 4
    order = np.argsort(flops)
    assert all(s.ranks[a] <= s.ranks[b] for a, b in zip(order, order[1:]))  # faster device, no lower rank
    assert build_fleet("jetson80", 8, 0) == sim_setup.profiles
    # default capacity: 1 / predicted time of a full-rank round (compute + WAN transfer)
    t = hetlora.Strategy(hetlora.Settings(rank_min=1), sim_setup)
    speed = hetlora.device_capacity(sim_setup, "round_time", 4)
    order = np.argsort(speed)
    assert all(t.ranks[a] <= t.ranks[b] for a, b in zip(order, order[1:])) and {min(t.ranks), max(t.ranks)} == {1, 4}
    with pytest.raises(ValueError, match="model.rank"):
        hetlora.Strategy(hetlora.Settings(rank_max=5), sim_setup)


def test_zero_pad_average_hand_computed_with_norm_weights_mixed_ranks_and_depths():
    G = {0: 2, 1: 2}
    base = {"0.q.A": torch.full((2, 2), 9.0), "0.q.B": torch.full((1, 2), 9.0),
            "1.q.A": torch.full((2, 2), 7.0), "1.q.B": torch.full((1, 2), 7.0), "head.w": torch.tensor([0.0])}
    # device 1: rank 1 in layer 1 only (device convention, scale α/1); device 2: rank 2 in layer 1 only
    d1 = {"1.q.A": torch.tensor([[1.0, 0.0]]), "1.q.B": torch.tensor([[0.5]]), "head.w": torch.tensor([4.0])}
    d2 = {"1.q.A": torch.tensor([[0.0, 2.0], [1.0, 0.0]]), "1.q.B": torch.tensor([[1.0, 0.0]]), "head.w": torch.tensor([8.0]),
          "0.q.A": torch.tensor([[1.0, 1.0], [0.0, 1.0]]), "0.q.B": torch.tensor([[2.0, 0.0]])}
    u1, u2 = from_device(d1, {1: 1}, G), from_device(d2, {0: 2, 1: 2}, G)
    assert torch.allclose(u1["1.q.B"], torch.tensor([[1.0]]))  # B rescaled by R/r = 2 into the server's α/R
    # ‖ΔW‖_F at the device's own scale: d1: 8·0.5·[1 0] -> 4; d2: 4·[0 2] -> 8
    w1 = hetlora.aggregation_weights(u1, 10, ALPHA, G, "norm")
    w2 = hetlora.aggregation_weights(u2, 30, ALPHA, G, "norm")
    assert w1["1.q.A"] == pytest.approx(4.0) and w2["1.q.B"] == pytest.approx(8.0)
    assert w1["head.w"] == 10 and w2["head.w"] == 30
    assert delta_norms(u2, ALPHA, G)[(1, "q")] == pytest.approx(float(delta_w(d2, 1, "q", ALPHA, 2).norm()))
    assert w2["0.q.A"] == pytest.approx(8 * 2**0.5)  # 4·[2 0]·[[1 1] [0 1]] = [8 8]
    out = zero_pad_average(base, [u1, u2], [{1: 1}, {0: 2, 1: 2}], [w1, w2])
    # A slot 0: (4·[1 0] + 8·[0 2]) / 12 = [1/3 4/3]; slot 1 held by d2 only, zero-padded: 8·[1 0]/12
    assert torch.allclose(out["1.q.A"], torch.tensor([[1 / 3, 4 / 3], [2 / 3, 0.0]]))
    # B (server convention): slot 0 (4·1 + 8·1)/12 = 1; slot 1: (4·0 + 8·0)/12 = 0
    assert torch.allclose(out["1.q.B"], torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(out["head.w"], torch.tensor([7.0]))  # (10·4 + 30·8) / 40
    # layer 0: only device 2 sent it, so only its weight counts: its own factors come back
    assert torch.allclose(out["0.q.A"], d2["0.q.A"]) and torch.allclose(out["0.q.B"], d2["0.q.B"])
    # data weighting, for contrast: A slot 1 = 30·[1 0] / 40
    outd = zero_pad_average(base, [u1, u2], [{1: 1}, {0: 2, 1: 2}], [10.0, 30.0])
    assert torch.allclose(outd["1.q.A"][1], torch.tensor([0.75, 0.0]))


def test_prune_penalty_is_the_tail_delta_w_norm_and_trains(tiny_cfg):
    assert trainer_options()[hetlora.PRUNE_KEY] is hetlora.prune_penalty
    sim = Simulation(tiny_cfg(**{"method.name": "hetlora"}))
    model, G = sim.model, sim.global_ranks
    state = {k: (v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) if k.endswith(".B") else v)
             for k, v in sim.state.items()}
    plan = DevicePlan(0, {l: 4 for l in range(4)}, (2, 3), 1, options={hetlora.PRUNE_KEY: 0.5, hetlora.GAMMA_KEY: 0.5})
    payload = to_device(state, plan.ranks, G)
    model.load(payload, plan.ranks, plan.train_layers)
    c = hetlora.tail_start(4, 0.5)
    assert c == 2
    want = 0.5 * sum(float((ALPHA / 4 * payload[f"{l}.{m}.B"][:, c:] @ payload[f"{l}.{m}.A"][c:]).norm())
                     for l in (2, 3) for m in model.layout.modules)
    assert float(hetlora.prune_penalty(model, plan, 0.5).detach()) == pytest.approx(want, rel=1e-5)
    # at B = 0 the term is 0 with a finite gradient, and training with it runs
    zero = to_device(sim.state, plan.ranks, G)
    model.load(zero, plan.ranks, plan.train_layers)
    term = hetlora.prune_penalty(model, plan, 0.5)
    term.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters() if p.grad is not None)
    batches = [next(iter(sim.test_batches))]
    settings = LocalTraining(seed=0, batch_size=16, lr=0.05, weight_decay=0.0, backward_ratio=1.0,
                             regularisers=trainer_options())
    upd_reg, _ = local_train(model, payload, plan, batches, settings, seed=0)
    plain = DevicePlan(0, plan.ranks, plan.train_layers, 1)
    upd_plain, _ = local_train(model, payload, plain, batches, settings, seed=0)
    tails = [hetlora.tail_norm(from_device(u, plan.ranks, G), 4, 0.5, ALPHA, G) for u in (upd_reg, upd_plain)]
    assert tails[0] < tails[1]


def test_tail_start():
    assert [hetlora.tail_start(r, 0.9) for r in (2, 4, 8, 20)] == [1, 3, 7, 18]
    assert hetlora.tail_start(8, 0.5) == 4


class FakeCtx:
    """Devices that return the state they got with B shrunk by `shrink` in the tail slots."""

    def __init__(self, rnd, n, G, shrink):
        self.rnd, self.available, self.rng = rnd, list(range(n)), np.random.default_rng(rnd)
        self.profiles, self.G, self.shrink = None, G, shrink

    def train(self, jobs):
        out = []
        for job in jobs:
            p = job.plan
            dev = to_device(job.state, p.ranks, self.G)
            for k in dev:
                if k.endswith(".B"):
                    dev[k] = dev[k] + 0.1
                    dev[k][:, hetlora.tail_start(p.ranks[0], 0.5):] *= self.shrink
            out.append(TrainResult(p.device, from_device(dev, p.ranks, self.G), 10, 1.0, 1.0, 0.1, 0.1, 1, 1))
        return Exchange(out)

    def release(self, state, results):
        return state  # no central DP


def test_self_pruning_shrinks_ranks_when_the_tail_decays_and_round_trips(tiny_cfg):
    setup = Simulation(tiny_cfg(**{"method.name": "hetlora", "fleet.name": "uniform"})).setup
    s = hetlora.Strategy(hetlora.Settings(rank_min=1, prune_strength=0.1, prune_gamma=0.5), setup)
    assert s.ranks == [4, 4, 4, 4]  # uniform fleet: everyone at the top rank
    state = {k: v.clone() for k, v in Simulation(tiny_cfg(**{"method.name": "hetlora", "fleet.name": "uniform"})).state.items()}
    state, rep = s.run_round(1, state, FakeCtx(1, 4, s.global_ranks(), 1.0))
    assert s.ranks == [4, 4, 4, 4] and rep.extra["pruned"] == []
    first = s.device_plan(0)
    assert first.options == {hetlora.PRUNE_KEY: 0.1, hetlora.GAMMA_KEY: 0.5}
    saved = json.loads(json.dumps(s.state_dict()))
    state, rep = s.run_round(2, state, FakeCtx(2, 4, s.global_ranks(), 0.1))  # the tails shrank: prune to ⌊γ·4⌋
    assert s.ranks == [2, 2, 2, 2] and rep.extra["pruned"] == [0, 1, 2, 3]
    assert rep.extra["device_config"][0] == {"device": 0, "depth": 4, "ranks": [4, 4, 4, 4]}
    t = hetlora.Strategy(hetlora.Settings(rank_min=1, prune_strength=0.1, prune_gamma=0.5), setup)
    t.load_state_dict(saved)
    assert t.state_dict() == saved


def test_hetlora_with_pruning_resumes_exactly(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"method.name": "hetlora", "method.rank_min": 1, "method.prune_strength": 0.01,
                      "run.rounds": 3, "run.checkpoint_every": 1, "fleet.num_devices": 3})

    class Killed(Exception):
        pass

    def kill_after_2(row):
        if row["round"] == 2:
            raise Killed

    run_experiment(cfg, tmp_path / "a", progress=False, export=False)
    prepare_run_dir(cfg, tmp_path / "b", overwrite=False)
    with pytest.raises(Killed):
        Simulation(cfg, tmp_path / "b").run(kill_after_2)
    assert main(["run", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert math.isfinite(rows(tmp_path / "a")[-1]["test_loss"])
