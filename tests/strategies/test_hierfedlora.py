import json
import math

import numpy as np
import pytest
import torch

from hierfedlora.engine import CHECKPOINT, Simulation
from hierfedlora.strategies.hierfedlora import layerwise_aggregate



def _t(x: float) -> torch.Tensor:
    return torch.tensor([[float(x)]])


def _layers(values: dict[int, float], head: float) -> dict[str, torch.Tensor]:
    out = {f"{l}.q.{f}": _t(v * (10 if f == "B" else 1)) for l, v in values.items() for f in ("A", "B")}
    out["head.w"] = torch.tensor([float(head)])
    return out


def test_layerwise_aggregation_hand_computed():
    # 4 layers; groups of depth 1, 2, 3 (layers {3}, {2,3}, {1,2,3}) with 1, 2 and 3 examples' weight
    base = _layers({0: 9, 1: 9, 2: 9, 3: 9}, 0)
    g1 = _layers({3: 1}, 1)
    g2 = _layers({2: 2, 3: 4}, 2)
    g3 = _layers({1: 5, 2: 8, 3: 10}, 4)
    out = layerwise_aggregate(base, [g1, g2, g3], [1, 2, 3])
    want = {0: 9.0,                      # nobody trained layer 0: kept
            1: 5.0,                      # only group 3: copied
            2: (2 * 2 + 3 * 8) / 5,      # groups 2, 3: 5.6
            3: (1 * 1 + 2 * 4 + 3 * 10) / 6}  # all groups: 6.5
    for l, v in want.items():
        assert out[f"{l}.q.A"].item() == pytest.approx(v)
        assert out[f"{l}.q.B"].item() == pytest.approx(10 * v)
    assert out["head.w"].item() == pytest.approx((1 * 1 + 2 * 2 + 3 * 4) / 6)
    assert out["1.q.A"] is g3["1.q.A"] or torch.equal(out["1.q.A"], g3["1.q.A"])


def test_single_group_full_depth_reproduces_fedlora_exactly(tiny_cfg):
    common = {"fleet.aggregator": "ps", "fleet.participation": 0.75, "fleet.dropout": 0.25, "run.rounds": 3,
              "partition.kind": "dirichlet", "partition.min_partition_size": 5}
    fed = Simulation(tiny_cfg(**common)).run()
    hier = Simulation(tiny_cfg(**common, **{"method.name": "hierfedlora", "method.num_groups": 1,
                                            "method.fixed_depth": 4, "method.fixed_tau": 1})).run()
    assert len(fed) == len(hier) == 4
    assert any(r.get("dropped") for r in fed)  # the dropout path is exercised too
    for a, b in zip(fed, hier):
        assert {k: b[k] for k in a} == a
    assert all(g["depth"] == 4 and g["tau"] == 1 for r in hier[1:] for g in r["groups"])


def _hier(tiny_cfg, **kw):
    base = {"method.name": "hierfedlora", "method.num_groups": 2, "partition.kind": "dirichlet",
            "partition.min_partition_size": 5}
    return tiny_cfg(**{**base, **kw})


def test_traffic_is_metered_per_link(tiny_cfg):
    # tiny-bert: 4 layers, rank 4: 512 LoRA params per layer, head 66; float32
    full, top2 = (4 * 512 + 66) * 4, (2 * 512 + 66) * 4
    sim = Simulation(_hier(tiny_cfg, **{"method.fixed_depth": 2, "method.fixed_tau": 2, "run.rounds": 1}))
    row = sim.step()
    # each device: whole model down, then top-2 up, top-2 down, top-2 up (LAN); each group's edge node: full down, top-2 up (WAN)
    assert row["bytes_lan"] == 4 * (full + 3 * top2)
    assert row["bytes_wan"] == 2 * (full + top2)
    ps = Simulation(_hier(tiny_cfg, **{"method.fixed_depth": 2, "method.fixed_tau": 2, "run.rounds": 1,
                                       "fleet.aggregator": "ps"})).step()
    assert ps["bytes_lan"] == 0 and ps["bytes_wan"] == 4 * (full + 3 * top2)
    g = row["groups"][0]
    assert g["time_s"] > 0 and g["predicted_s"] == pytest.approx(g["time_s"], rel=0.5)


def test_end_to_end_records_arms_and_outputs(tiny_cfg, tmp_path):
    from hierfedlora.experiment import run_experiment

    cfg = _hier(tiny_cfg, **{"run.rounds": 4, "run.eval_every": 2})
    run_experiment(cfg, tmp_path, progress=False, export=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sim_arms = {(d, t) for d in range(1, 5) for t in (1, 2, 4)}
    for r in rows[1:]:
        assert len(r["groups"]) == 2 and r["round_time_s"] == pytest.approx(max(g["time_s"] for g in r["groups"]))
        for g in r["groups"]:
            assert (g["depth"], g["tau"]) in sim_arms and g["eligible"]
            assert g["predicted_s"] <= g["budget_s"] * (1 + 1e-9)
            assert math.isfinite(g["reward"]) and g["time_s"] > 0
    assert len({(g["depth"], g["tau"]) for r in rows[1:] for g in r["groups"]}) > 1  # the bandit explores
    assert (tmp_path / "arms.png").stat().st_size > 0
    rep = json.loads((tmp_path / "grouping.json").read_text())
    assert sorted(i for g in rep["groups"] for i in g["members"]) == [0, 1, 2, 3]
    assert all(g["slowest_round_s"] >= g["fastest_round_s"] > 0 for g in rep["groups"])


def test_budget_excludes_arms_and_falls_back_to_cheapest(tiny_cfg):
    sim = Simulation(_hier(tiny_cfg, **{"method.round_budget_s": 1e-6, "run.rounds": 1}))
    g = sim.step()["groups"]
    assert all((x["depth"], x["tau"], x["eligible"]) == (1, 1, False) for x in g)


def test_resume_repeats_the_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = _hier(tiny_cfg, **{"run.rounds": 4, "run.checkpoint_every": 2})
    full = Simulation(cfg).run()

    class Killed(Exception):
        pass

    def kill_after_3(row):
        if row["round"] == 3:
            raise Killed

    with pytest.raises(Killed):
        Simulation(cfg, tmp_path).run(kill_after_3)
    resumed = Simulation(cfg, tmp_path)
    resumed.load_checkpoint(tmp_path / CHECKPOINT)  # written after round 2: groups and bandit statistics
    assert resumed.round == 2
    assert resumed.run() == full
    d = resumed.strategy.state_dict()
    other = Simulation(cfg).strategy
    other.load_state_dict(json.loads(json.dumps(d)))  # plain JSON-able types
    assert other.state_dict() == d


def test_random_grouping_ablation_uses_seeded_random_groups(tiny_cfg):
    from hierfedlora.engine import Simulation
    from hierfedlora.grouping import random_groups

    cfg = tiny_cfg(**{"method.name": "hierfedlora", "method.num_groups": 2, "method.grouping": "random", "run.rounds": 1})
    sim = Simulation(cfg)
    assert sim.strategy.groups == random_groups(cfg.fleet.num_devices, 2, cfg.run.seed)
    sim.step()


# -- private grouping (grouping_input) --------------------------------------------------------------

@pytest.mark.parametrize("grouping_input,eps", [("ldp", 1.0), ("pooled", 1.0), ("embeddings", None)])
def test_private_grouping_input_runs_and_reports(tiny_cfg, tmp_path, grouping_input, eps):
    from hierfedlora.experiment import run_experiment

    sets = {"method.grouping_input": grouping_input, "run.rounds": 1, "fleet.num_devices": 6, "method.grouping_passes": 3}
    if eps is not None:
        sets["method.grouping_epsilon"] = eps
    run_experiment(_hier(tiny_cfg, **sets), tmp_path, progress=False, export=False)
    rep = json.loads((tmp_path / "grouping.json").read_text())
    assert sorted(i for g in rep["groups"] for i in g["members"]) == list(range(6))
    priv = rep["private_grouping"]
    assert priv["input"] == grouping_input and priv["epsilon"] == eps
    assert priv["kl_sum"] == pytest.approx(sum(g["kl_to_global"] for g in rep["groups"]))  # true histograms
    assert priv["exact_kl_sum"] >= 0 and priv["random_kl_sum"] >= 0
    if grouping_input == "pooled":
        assert 0 < priv["epsilon_spent"] <= eps and priv["releases"] >= 1


def test_histograms_input_gives_todays_groups(tiny_cfg):
    from hierfedlora.grouping import group_devices

    sim = Simulation(_hier(tiny_cfg, **{"fleet.num_devices": 6}))
    st = sim.strategy
    assert st.s.grouping_input == "histograms"
    assert st.groups == group_devices(sim.setup.label_hists, st.device_round_s, 2, st.s.grouping_lambda,
                                      st.s.size_slack, sim.setup.seed, st.s.grouping_passes)
    rep = st.grouping()["private_grouping"]
    assert rep["kl_sum"] == rep["exact_kl_sum"]


def test_embeddings_grouping_on_open_instruction_data(tiny_llm_cfg):
    sim = Simulation(tiny_llm_cfg(**{"method.name": "hierfedlora", "method.num_groups": 2, "task.answers": "open",
                                     "method.grouping_input": "embeddings", "run.rounds": 1}))
    assert sim.work.answers is None  # open answers: the "labels" are prompt clusters
    assert sorted(i for g in sim.strategy.groups for i in g) == [0, 1, 2, 3]
    emb = sim.setup.device_embeddings()
    assert emb.shape[0] == 4 and np.all(np.isfinite(emb)) and emb is sim.setup.device_embeddings()  # computed once


@pytest.mark.parametrize("sets,match", [
    ({"method.grouping_input": "ldp", "method.grouping_epsilon": 0.0}, "method.grouping_epsilon"),
    ({"method.grouping_input": "pooled", "method.grouping_epsilon": -1.0}, "method.grouping_epsilon"),
    ({"method.grouping_epsilon": 1.0}, "method.grouping_epsilon"),  # histograms add no noise
    ({"method.grouping": "random", "method.grouping_input": "ldp"}, "method.grouping_input"),
    ({"method.grouping_input": "pooled", "method.num_groups": 3}, "method.num_groups"),  # 4 devices: groups of 1
])
def test_bad_private_grouping_settings(tiny_cfg, sets, match):
    from hierfedlora.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        Simulation(_hier(tiny_cfg, **sets))


def test_resume_repeats_the_uninterrupted_run_with_ldp_grouping(tiny_cfg, tmp_path, interrupted_run):
    cfg = _hier(tiny_cfg, **{"run.rounds": 3, "run.checkpoint_every": 1, "fleet.num_devices": 6,
                             "method.grouping_input": "ldp", "method.grouping_epsilon": 0.5})
    full = Simulation(cfg).run()
    out = tmp_path / "run"
    interrupted_run(cfg, out, after=2)
    resumed = Simulation(cfg, out)
    resumed.load_checkpoint(out / CHECKPOINT)
    assert resumed.round == 2 and resumed.strategy.groups == Simulation(cfg).strategy.groups
    assert resumed.run() == full
