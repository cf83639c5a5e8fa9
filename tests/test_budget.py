"""Equal simulated-time budgets (`run.budget_s`): a run stops at the first round whose clock crosses
the budget, is evaluated there, reports the score at the budget, and resumes to the same rows."""

import json

from hierfedlora.cli import main
from hierfedlora.engine import Simulation
from hierfedlora.experiment import run_experiment


def test_budgeted_run_stops_at_the_first_round_that_crosses_and_evaluates_there(tiny_cfg):
    free = Simulation(tiny_cfg(**{"run.rounds": 8, "run.eval_every": 3})).run()
    times = [r["sim_time_s"] for r in free]
    budget = float(times[4] + times[5]) / 2  # crossed during round 5
    sim = Simulation(tiny_cfg(**{"run.rounds": 8, "run.eval_every": 3, "run.budget_s": budget}))
    rows = sim.run()
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[4]["sim_time_s"] < budget <= rows[5]["sim_time_s"]
    assert "test_acc" in rows[5] and "test_acc" not in rows[4] and "test_acc" in rows[3]  # forced at the crossing
    for a, b in zip(rows, free):  # the budget changes when the run stops, nothing it computes
        assert a["sim_time_s"] == b["sim_time_s"] and a["bytes_up"] == b["bytes_up"]
    s = sim.summary()
    # the score at the budget is the last evaluation at or before it (round 3), not the one after
    assert s["budget_s"] == budget and s["budget_reached"] and s["round_at_budget"] == 3
    assert s["score_at_budget"] == rows[3]["test_acc"] and s["final_acc"] == rows[5]["test_acc"]


def test_round_cap_before_the_budget_is_reported(tiny_cfg):
    sim = Simulation(tiny_cfg(**{"run.rounds": 2, "run.budget_s": 1e9}))
    rows = sim.run()
    assert rows[-1]["round"] == 2 and "test_acc" in rows[-1]
    assert sim.summary()["budget_reached"] is False


def test_resumed_budgeted_run_equals_uninterrupted(tiny_cfg, tmp_path, interrupted_run):
    probe = Simulation(tiny_cfg(**{"run.rounds": 6})).run()
    cfg = tiny_cfg(**{"run.rounds": 50, "run.eval_every": 2, "run.checkpoint_every": 2,
                      "run.budget_s": float(probe[4]["sim_time_s"] + probe[5]["sim_time_s"]) / 2})
    run_experiment(cfg, tmp_path / "a", progress=False, export=False)
    interrupted_run(cfg, tmp_path / "b", after=3)
    assert main(["run", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b") and read(tmp_path / "a")[-1]["round"] == 5
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "a", tmp_path / "b"))
    assert {k: v for k, v in a.items() if k != "wall_time_s"} == {k: v for k, v in b.items() if k != "wall_time_s"}
    assert a["budget_reached"] and a["round_at_budget"] == 4
