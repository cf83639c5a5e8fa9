"""The training-memory estimate (design.md §4.2): its arithmetic, a plan over a device's memory
refused by name, and LEGEND / HierFedLoRA treating depths that do not fit as not eligible."""

import json

import pytest

from hierfedlora.cli import main
from hierfedlora.clock import ModelCost, train_memory_bytes
from hierfedlora.engine import PlanError, Simulation
from hierfedlora.experiment import run_experiment


def test_estimate_by_hand():
    cost = ModelCost(hidden=8, intermediate=16, heads=2, lm_head=100, frozen_bytes=1000)
    # weights 1000 + 4·50 LoRA + 12·20 trained; activations 3 layers · 2 · s=5 · b=2 · (34·8 + 5·2·5); logits 8·100·7
    want = 1000 + 200 + 240 + 3 * 2 * 5 * 2 * (272 + 50) + 8 * 100 * 7
    assert train_memory_bytes(cost, 50, 20, 3, batch=2, seq_len=5, head_tokens=7) == want


def fleet_file(path, memory_gb: float, count: int = 4):
    path.write_text(f"[[device]]\nkind = \"tiny\"\ncount = {count}\nflops = 1e10\nmemory_gb = {memory_gb}\nwan_up_mbps = 10\n")
    return str(path)


def needs(cfg, depth: int) -> float:
    sim = Simulation(cfg)
    ranks = dict(sim.global_ranks)
    return sim.setup.predict_memory_bytes(0, ranks, depth)


def test_plan_over_memory_is_refused_by_name(tiny_llm_cfg, tmp_path):
    cfg = tiny_llm_cfg(**{"fleet.name": fleet_file(tmp_path / "f.toml", 1e-6), "run.rounds": 1})
    with pytest.raises(PlanError, match=r"device 0 \(tiny, 1e-06 GB\) cannot train its plan: 4 trained layers need"):
        run_experiment(cfg, tmp_path / "r", progress=False)
    assert main(["run", "--set", f'fleet.name="{tmp_path / "f.toml"}"', "--set", 'model.name="tiny-bert"',
                 "--set", "run.rounds=1", "--set", "fleet.num_devices=4", "--out", str(tmp_path / "c"), "--quiet"]) == 2


def test_run_reports_memory_estimates(tiny_llm_cfg, tmp_path):
    run_experiment(tiny_llm_cfg(**{"run.rounds": 1}), tmp_path / "r", progress=False, export=False)
    rep = json.loads((tmp_path / "r" / "memory.json").read_text())
    ran = [d for d in rep["devices"] if d["peak_estimate_gb"] is not None]
    assert ran and all(0 < d["peak_estimate_gb"] < d["memory_gb"] for d in ran)


@pytest.mark.parametrize("method,settings", [("hierfedlora", {"method.num_groups": 2, "method.taus": [1],
                                                              "method.depths": [1, 2, 4]}),
                                             ("legend", {"method.depth_min": 1})])
def test_depths_over_memory_are_not_eligible(tiny_llm_cfg, tmp_path, method, settings):
    probe = tiny_llm_cfg(**{"method.name": method, **settings})
    gb = (needs(probe, 1) + needs(probe, 2)) / 2 / 1e9  # depth 1 fits, depth 2 does not
    cfg = tiny_llm_cfg(**{"method.name": method, "fleet.name": fleet_file(tmp_path / "f.toml", gb), "run.rounds": 2,
                          **settings})
    rows = Simulation(cfg).run()
    if method == "hierfedlora":
        depths = [g["depth"] for r in rows[1:] for g in r["groups"]]
    else:
        depths = [c["depth"] for r in rows[1:] for c in r["device_config"]]
    assert depths and set(depths) == {1}
    unlimited = Simulation(tiny_llm_cfg(**{"method.name": method, "run.rounds": 1, **settings})).run()
    if method == "legend":  # with memory to spare the same fleet trains deeper
        assert max(c["depth"] for c in unlimited[1]["device_config"]) > 1
