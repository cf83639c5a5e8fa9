import dataclasses
import json

import numpy as np
import pytest
import torch

from hierfedlora.adapter import load_adapter
from hierfedlora.aggregate import masked_slot_average, slot_counts
from hierfedlora.experiment import run_experiment
from hierfedlora.clock import ModelCost
from hierfedlora.engine import Simulation
from hierfedlora.fleet import build_fleet, round_profiles
from hierfedlora.lora_state import delta_w, from_device, to_device
from hierfedlora.strategies import legend
from hierfedlora.protocol import Exchange, Layout, SetupInfo, TrainResult

ALPHA = 8.0


def minilm_setup(profiles, rank=8) -> SetupInfo:
    """A MiniLM-shaped setup (6 layers, hidden 384, LoRA on query and value) without loading the model."""
    h, n = 384, len(profiles)
    lay = Layout(6, {"attention.self.query": (h, h), "attention.self.value": (h, h)},
                 {"head.classifier.weight": (2, h), "head.classifier.bias": (2,)})
    return SetupInfo(lay, profiles, [100] * n, np.ones((n, 2)), [40.0] * n, ModelCost(h, 4 * h), rank, 16.0, 4, 16, 4,
                     1.0, "edge", 0)


def test_rank_distribution_rises_and_fits_the_budget():
    # R_l = ⌊2 + 6·l/5 + ½⌋
    assert legend.rank_ramp(6, 2, 8) == [2, 3, 4, 6, 7, 8]
    # [1 2 3 4] over budget 6: the largest c with Σ⌊c·R_l⌋ ≤ 6 is 3/4 -> [0 1 2 3]
    assert legend.fit_rank_budget([1, 2, 3, 4], 6) == [0, 1, 2, 3]
    assert legend.fit_rank_budget([1, 2, 3, 4], 10) == [1, 2, 3, 4]
    for budget in range(1, 40):
        r = legend.fit_rank_budget(legend.rank_ramp(6, 2, 8), budget)
        assert sum(r) <= budget and r == sorted(r) and r[-1] >= 1


def test_config_ladder_goes_shallower_then_lower_rank():
    G = {0: 0, 1: 2, 2: 3, 3: 4}
    ladder = legend.config_ladder(G, 1, 3, True)
    assert ladder[:3] == [{1: 2, 2: 3, 3: 4}, {2: 3, 3: 4}, {3: 4}]
    assert ladder[3:] == [{3: 3}, {3: 2}, {3: 1}]  # depth 1, top rank 4·k/4 for k = 3, 2, 1
    assert legend.config_ladder(G, 2, 2, True) == [{2: 3, 3: 4}, {2: 2, 3: 3}, {2: 1, 3: 2}, {2: 1, 3: 1}]
    assert legend.config_ladder(G, 2, 3, False) == [{1: 2, 2: 3, 3: 4}, {2: 3, 3: 4}]


def test_choose_rungs_hand_computed():
    times = np.array([[1.0, 0.8, 0.5], [4.0, 3.0, 2.0], [2.0, 1.5, 1.0]])
    traffic = np.array([30.0, 20.0, 10.0])
    # T* = max(median of (1, 4, 2) = 2, slowest leanest = 2) = 2 -> rungs 0, 2, 0
    idx, target, met = legend.choose_rungs(times, traffic, 0.5, None)
    assert target == 2.0 and idx.tolist() == [0, 2, 0] and met
    # q = 1: everyone at the full configuration
    assert legend.choose_rungs(times, traffic, 1.0, None)[0].tolist() == [0, 0, 0]
    # budget 50: 70 -> step device 0 (traffic 30, tie with 2 broken by the shorter time) -> 60 -> device 2 -> 50
    idx, _, met = legend.choose_rungs(times, traffic, 0.5, 50.0)
    assert idx.tolist() == [1, 2, 1] and met
    idx, _, met = legend.choose_rungs(times, traffic, 0.5, 5.0)
    assert idx.tolist() == [2, 2, 2] and not met


def test_masked_slot_average_hand_computed_with_mixed_ranks_depths_and_scales():
    G = {0: 2, 1: 2}  # server ranks
    base = {"0.q.A": torch.full((2, 1), 9.0), "0.q.B": torch.full((1, 2), 9.0),
            "1.q.A": torch.full((2, 1), 7.0), "1.q.B": torch.full((1, 2), 7.0), "head.w": torch.tensor([0.0])}
    # device 1: depth 1 (layer 1) at rank 1; device 2: depth 2, rank 2 in both layers (device convention)
    r1, r2 = {1: 1}, {0: 2, 1: 2}
    d1 = {"1.q.A": torch.tensor([[2.0]]), "1.q.B": torch.tensor([[3.0]]), "head.w": torch.tensor([1.0])}
    d2 = {"0.q.A": torch.tensor([[1.0], [1.0]]), "0.q.B": torch.tensor([[1.0, 1.0]]),
          "1.q.A": torch.tensor([[4.0], [6.0]]), "1.q.B": torch.tensor([[1.0, 5.0]]), "head.w": torch.tensor([5.0])}
    u1, u2 = from_device(d1, r1, G), from_device(d2, r2, G)
    # α/r scaling: device 1 runs scale α/1, the server α/2, so its B doubles and its ΔW is unchanged
    assert torch.allclose(u1["1.q.B"], torch.tensor([[6.0]]))
    assert torch.allclose(delta_w(u1 | {"1.q.A": u1["1.q.A"]}, 1, "q", ALPHA, 2), delta_w(d1, 1, "q", ALPHA, 1))
    assert slot_counts([r1, r2], G) == {0: [1, 1], 1: [2, 1]}
    out = masked_slot_average(base, [u1, u2], [r1, r2], [1.0, 3.0])
    # layer 1 slot 0 held by both: A (1·2 + 3·4)/4 = 3.5, B (1·6 + 3·1)/4 = 2.25; slot 1 by device 2: 6 and 5
    assert torch.allclose(out["1.q.A"], torch.tensor([[3.5], [6.0]]))
    assert torch.allclose(out["1.q.B"], torch.tensor([[2.25, 5.0]]))
    # layer 0 only device 2: its values; the head: (1 + 15)/4
    assert torch.allclose(out["0.q.A"], d2["0.q.A"]) and torch.allclose(out["0.q.B"], d2["0.q.B"])
    assert torch.allclose(out["head.w"], torch.tensor([4.0]))
    # devices get back the averaged slots at their own scale: device 1's B slot 0 = 2.25·(1/2)
    assert torch.allclose(to_device(out, r1, G)["1.q.B"], torch.tensor([[1.125]]))
    with pytest.raises(ValueError, match="mask declares"):
        masked_slot_average(base, [u1], [{0: 1, 1: 1}], [1.0])


@pytest.mark.parametrize("seed", [0, 1])
def test_configuration_on_jetson80_evens_round_times_within_budget(seed):
    base = build_fleet("jetson80", 80, seed)
    profiles = round_profiles(base, 1, seed, 0.3)  # this round's fluctuating bandwidth
    setup = minilm_setup(base)
    s = legend.Settings()
    G = legend.rank_distribution(6, 2, 8, None)
    full = legend.configure(setup, legend.Settings(target_quantile=1.0), G, profiles)
    chosen = legend.configure(setup, s, G, profiles)
    assert all(r == G for r in full.ranks)  # q = 1: the uniform, full configuration
    uni, cho = np.array(full.predicted_s), np.array(chosen.predicted_s)
    assert np.ptp(cho) < np.ptp(uni) / 3 and cho.std() < uni.std() / 3
    assert cho.max() <= chosen.target_s * (1 + 1e-9) and chosen.target_s < uni.max() / 2
    depths = [len(r) for r in chosen.ranks]
    assert min(depths) < 6 and max(depths) == 6
    # predictions are what the clock charges: compute + download + upload of exactly these tensors
    i = int(np.argmax(cho))
    nbytes = setup.payload_bytes(chosen.ranks[i])
    assert cho[i] == pytest.approx(setup.predict_compute_s(i, depths[i], profile=profiles[i])
                                   + setup.predict_transfer_s(i, nbytes, nbytes, profile=profiles[i]))
    # budgets: the rank budget bounds Σ_l R_l, the traffic budget a round's bytes
    G_b = legend.rank_distribution(6, 2, 8, 18)
    assert sum(G_b.values()) <= 18 and list(G_b.values()) == sorted(G_b.values())
    cap = 0.5 * sum(2 * setup.payload_bytes(r) for r in chosen.ranks) / 1e6
    tight = legend.configure(setup, s.model_copy(update={"traffic_budget_mb": cap}), G, profiles)
    assert tight.budget_met and sum(2 * setup.payload_bytes(r) for r in tight.ranks) <= cap * 1e6
    assert np.ptp(tight.predicted_s) < np.ptp(uni) / 3


class FakeCtx:
    """Devices return what they got, B + 1 (server convention), without training; no model needed."""

    def __init__(self, rnd, profiles, G):
        self.rnd, self.profiles, self.G = rnd, profiles, G
        self.available, self.rng = list(range(len(profiles))), np.random.default_rng(rnd)
        self.jobs = []

    def train(self, jobs):
        self.jobs += jobs
        out = []
        for job in jobs:
            p = job.plan
            dev = to_device(job.state, p.ranks, self.G)
            up = {k: (v + 1.0 if k.endswith(".B") else v) for k, v in dev.items()}
            out.append(TrainResult(p.device, from_device(up, p.ranks, self.G), 10, 1.0, 1.0, 0.1, 0.1, 1, 1))
        return Exchange(out)

    def release(self, state, results):
        return state  # no central DP


def test_strategy_plans_reconfigures_on_schedule_and_round_trips():
    base = build_fleet("jetson80", 10, 0)
    setup = minilm_setup(base)
    s = legend.Strategy(legend.Settings(reconfigure_every=2), setup)
    G = s.global_ranks()
    assert G == dict(enumerate([2, 3, 4, 6, 7, 8])) and s.lowest_trainable_layer() == 0
    state = {}
    for l, R in G.items():
        for m, (i, o) in setup.layout.modules.items():
            state[f"{l}.{m}.A"], state[f"{l}.{m}.B"] = torch.ones(R, i), torch.zeros(o, R)
    state["head.classifier.weight"], state["head.classifier.bias"] = torch.zeros(2, 384), torch.zeros(2)
    slow = [dataclasses.replace(p, wan_up_Bps=p.wan_up_Bps / 50, wan_down_Bps=p.wan_down_Bps / 50) if i % 2 else p
            for i, p in enumerate(base)]
    reports = []
    for rnd, prof in [(1, base), (2, slow), (3, slow)]:
        ctx = FakeCtx(rnd, prof, G)
        state, rep = s.run_round(rnd, state, ctx)
        reports.append(rep)
        for job, cfg in zip(ctx.jobs, rep.extra["device_config"]):
            assert sorted(job.plan.ranks) == list(range(6 - cfg["depth"], 6)) == list(job.plan.train_layers)
            assert [job.plan.ranks.get(l, 0) for l in range(6)] == cfg["ranks"]
            assert all(r <= G[l] for l, r in job.plan.ranks.items())
    # round 2 keeps round 1's configuration (reconfigure_every = 2); round 3 sees the slow links
    assert reports[1].extra["device_config"] == reports[0].extra["device_config"]
    assert reports[2].extra["device_config"] != reports[1].extra["device_config"]
    saved = json.loads(json.dumps(s.state_dict()))
    t = legend.Strategy(legend.Settings(reconfigure_every=2), setup)
    t.load_state_dict(saved)
    assert t.state_dict() == s.state_dict() and t.config == s.config
    # B moves (from 0) exactly in the layers some device trained; every device trains the top one
    trained = {l for rep in reports for c in rep.extra["device_config"] for l, r in enumerate(c["ranks"]) if r}
    assert 5 in trained
    for l in range(6):
        assert bool(state[f"{l}.attention.self.query.B"].abs().sum() > 0) == (l in trained)

def test_same_full_configuration_gives_fedlora_metrics(tiny_cfg):
    """LEGEND (all devices at full depth and rank) and HetLoRA (all at the top rank, data weights)
    reduce to FedLoRA: same plans, same bytes, same aggregate."""
    common = {"fleet.bandwidth_jitter": 0.3, "fleet.dropout": 0.2, "run.rounds": 3}
    runs = {
        "fedlora": {"method.name": "fedlora"},
        "legend": {"method.name": "legend", "method.rank_min": 4, "method.target_quantile": 1.0},
        "hetlora": {"method.name": "hetlora", "method.rank_min": 4, "method.weighting": "data"},
    }
    rows = {k: Simulation(tiny_cfg(**common, **v)).run() for k, v in runs.items()}
    keys = set(rows["fedlora"][1])
    assert {"test_acc", "bytes_up", "sim_time_s", "dropped"} <= keys
    for name in ("legend", "hetlora"):
        assert all(c["depth"] == 4 and c["ranks"] == [4] * 4 for c in rows[name][-1]["device_config"])
        assert len(rows[name]) == len(rows["fedlora"])
        for a, b in zip(rows["fedlora"], rows[name]):
            for k in a:
                if isinstance(a[k], float):
                    assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (name, a["round"], k)
                else:
                    assert b[k] == a[k], (name, a["round"], k)


def test_legend_run_exports_an_adapter_peft_reloads(tiny_cfg, tmp_path, adapter_accuracy):
    # rank_min 1 and budget 6: R = [0, 1, 2, 3] -- no LoRA in layer 0, a different rank in every other layer
    cfg = tiny_cfg(**{"method.name": "legend", "method.rank_min": 1, "method.rank_budget": 6, "run.rounds": 3,
                      "train.local_steps": 4, "fleet.num_devices": 5})
    summary = run_experiment(cfg, tmp_path / "r", progress=False)
    sim = Simulation(cfg)
    assert sim.global_ranks == {0: 0, 1: 1, 2: 2, 3: 3}
    conf = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert sorted(set(conf["rank_pattern"].values())) == [1, 2, 3]
    assert not any(".0." in k for k in conf["target_modules"])
    model, _, _ = load_adapter(tmp_path / "r" / "adapter")
    assert adapter_accuracy(model, sim.test_batches) == pytest.approx(summary["final_acc"], abs=1e-9)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("device_config" in r and "target_round_s" in r for r in rows[1:])
