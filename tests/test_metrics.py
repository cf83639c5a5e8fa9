"""Macro-F1 and the confusion matrix (`hierfedlora.metrics`), and `run.metric`: which score the
summary, the target and HierFedLoRA's accuracy reward use."""

import json

import numpy as np
import pytest

from hierfedlora.config import ConfigError
from hierfedlora.engine import Simulation, config_fingerprint
from hierfedlora.experiment import run_experiment
from hierfedlora.metrics import accuracy, confusion_counts, macro_f1
from hierfedlora.protocol import Scores
from hierfedlora.strategies.hierfedlora import reward_of

# rows true, columns predicted; class 2 occurs (2 examples) but is never predicted, class 3 never occurs
C = np.array([[3, 1, 0, 0],
              [1, 2, 0, 0],
              [1, 1, 0, 0],
              [0, 0, 0, 0]])


def test_confusion_counts_rows_are_true_and_columns_predicted():
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2]
    preds = [0, 0, 0, 1, 0, 1, 1, 0, 1]
    got = confusion_counts(np.array(labels), np.array(preds), 4)
    assert got.tolist() == [[3, 1, 0, 0], [1, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert got.tolist() == C.tolist()


def test_macro_f1_hand_computed_with_a_class_never_predicted():
    # TP = (3, 2, 0); FP = column sums − TP = (2, 2, 0); FN = row sums − TP = (1, 1, 2)
    # F1 = 6/9, 4/7, 0/2; class 3 (in neither labels nor predictions) is left out of the mean
    assert macro_f1(C) == pytest.approx((6 / 9 + 4 / 7 + 0.0) / 3)
    assert macro_f1(C) == pytest.approx(26 / 63)
    assert accuracy(C) == 5 / 9
    # a class that is only predicted (never true) counts, with F1 = 0
    only_predicted = np.array([[2, 1], [0, 0]])  # F1_0 = 4/(4+0+1), F1_1 = 0/(0+1+0)
    assert macro_f1(only_predicted) == pytest.approx((4 / 5 + 0.0) / 2)
    assert macro_f1(np.eye(3, dtype=int) * 7) == 1.0


def test_scores_metric_names_the_score_and_open_answers_have_no_macro_f1():
    s = Scores.of_classes(0.5, C)
    assert (s.acc, s.macro_f1, s.confusion[2]) == (5 / 9, macro_f1(C), (1, 1, 0, 0))
    assert s.metric("accuracy") == 5 / 9 and s.metric("macro_f1") == macro_f1(C)
    with pytest.raises(ValueError, match="macro_f1"):
        Scores(1.0, 0.3).metric("macro_f1")


def test_reward_uses_the_named_metric():
    # accuracy rises by 0.1 while macro-F1 falls by 0.2 (the model drifts toward the majority class)
    before, after = Scores(0.9, 0.6, 0.5), Scores(0.7, 0.7, 0.3)
    assert reward_of(before, after, 2.0, "accuracy") == pytest.approx(0.05)
    assert reward_of(before, after, 2.0, "macro_f1") == pytest.approx(-0.1)
    assert reward_of(before, after, 2.0, "loss") == pytest.approx(0.1)


def test_hierfedlora_accuracy_reward_follows_run_metric(tiny_cfg):
    before, after = Scores(0.9, 0.6, 0.5), Scores(0.7, 0.7, 0.3)
    for metric, expected in (("accuracy", 0.05), ("macro_f1", -0.1)):
        cfg = tiny_cfg(**{"run.metric": metric, "method.name": "hierfedlora", "method.num_groups": 2,
                          "method.reward": "accuracy"})
        sim = Simulation(cfg)
        row: dict = {}
        sim.strategy._reward(0, 0, before, after, 2.0, 2, row)
        assert row["reward"] == pytest.approx(expected)
        assert (row["val_acc"], row["val_macro_f1"]) == (0.7, 0.3)


def test_run_writes_the_confusion_of_its_final_evaluation(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"run.rounds": 2, "run.eval_every": 1, "run.metric": "macro_f1"})
    out = tmp_path / "run"
    summary = run_experiment(cfg, out, progress=False, export=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    conf = json.loads((out / "confusion.json").read_text())
    counts = np.array(conf["counts"])
    last = rows[-1]
    assert conf["labels"] == ["neg", "pos"] and conf["round"] == 2 and (out / "confusion.png").stat().st_size > 0
    assert counts.sum() == 120  # 600 examples × test_fraction 0.2
    assert last["test_macro_f1"] == macro_f1(counts) and last["test_acc"] == np.trace(counts) / counts.sum()
    assert all("test_macro_f1" in r and 0 <= r["test_macro_f1"] <= 1 for r in rows)
    # the run is scored by macro-F1; accuracy is still reported
    assert summary["score"] == "test_macro_f1" and summary["final_score"] == last["test_macro_f1"]
    assert summary["best_score"] == max(r["test_macro_f1"] for r in rows)
    assert summary["final_acc"] == last["test_acc"]


def test_run_metric_selects_what_summary_and_target_use(tiny_cfg):
    # accuracy reaches 0.8 at 10 s, macro-F1 only at 20 s
    rows = [{"round": 0, "sim_time_s": 0.0, "bytes_up": 0, "bytes_down": 0, "test_acc": 0.5, "test_macro_f1": 0.33},
            {"round": 1, "sim_time_s": 10.0, "bytes_up": 5, "bytes_down": 5, "test_acc": 0.8, "test_macro_f1": 0.6},
            {"round": 2, "sim_time_s": 20.0, "bytes_up": 9, "bytes_down": 9, "test_acc": 0.79, "test_macro_f1": 0.81}]
    got = {}
    for metric in ("accuracy", "macro_f1"):
        sim = Simulation(tiny_cfg(**{"run.metric": metric, "run.target_acc": 0.8}))
        sim.rows, sim.round = rows, 2
        got[metric] = sim.summary()
    acc, f1 = got["accuracy"], got["macro_f1"]
    assert (acc["time_to_target_s"], acc["bytes_to_target"]) == (10.0, 10)
    assert (f1["time_to_target_s"], f1["bytes_to_target"]) == (20.0, 18)
    assert "score" not in acc and (acc["final_acc"], acc["best_acc"]) == (0.79, 0.8)
    assert (f1["score"], f1["final_score"], f1["best_score"]) == ("test_macro_f1", 0.81, 0.81)
    assert (f1["final_acc"], f1["best_acc"]) == (0.79, 0.8)


def test_run_metric_is_checked_and_changes_the_fingerprint_only_when_set(tiny_cfg):
    with pytest.raises(ConfigError, match="run.metric"):
        tiny_cfg(**{"run.metric": "f1"})
    default, f1 = tiny_cfg(), tiny_cfg(**{"run.metric": "macro_f1"})
    assert config_fingerprint(default) != config_fingerprint(f1)
    assert config_fingerprint(default) == config_fingerprint(tiny_cfg(**{"run.metric": "accuracy"}))


def test_compare_scores_runs_by_their_metric_and_refuses_a_mix(tmp_path):
    from hierfedlora.compare import Run, write_report

    rows = [{"round": 0, "sim_time_s": 0.0, "bytes_up": 0, "bytes_down": 0, "test_acc": 0.5, "test_macro_f1": 0.33},
            {"round": 1, "sim_time_s": 10.0, "bytes_up": 5, "bytes_down": 5, "test_acc": 0.8, "test_macro_f1": 0.6}]
    f1 = Run("fedlora", 0, tmp_path, rows, {"score": "test_macro_f1", "final_score": 0.6, "final_acc": 0.8,
                                             "sim_time_s": 10.0})
    acc = Run("fedlora", 1, tmp_path, rows, {"final_acc": 0.8, "sim_time_s": 10.0})
    assert (f1.final, f1.score_at(5.0), f1.to_target(0.7)) == (0.6, 0.33, None)
    assert (acc.final, acc.to_target(0.7)["round"]) == (0.8, 1)
    with pytest.raises(ConfigError, match="different metrics"):
        write_report([f1, acc], tmp_path)


def test_instruction_class_answers_get_macro_f1_and_a_confusion(tiny_llm_cfg, tmp_path):
    cfg = tiny_llm_cfg(**{"run.rounds": 1, "run.metric": "macro_f1"})
    out = tmp_path / "llm"
    summary = run_experiment(cfg, out, progress=False, export=False)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    conf = json.loads((out / "confusion.json").read_text())
    counts = np.array(conf["counts"])
    assert sorted(conf["labels"]) == ["negative", "positive"] and counts.sum() == 60  # 300 × 0.2
    assert last["test_macro_f1"] == macro_f1(counts) and last["test_acc"] == pytest.approx(np.trace(counts) / 60)
    assert summary["score"] == "test_macro_f1" and summary["zero_shot_score"] is not None


def test_macro_f1_is_refused_for_open_answers(tiny_llm_cfg, tmp_path):
    import pandas as pd

    f = tmp_path / "open.csv"
    words = "red green blue cyan pink gold gray teal".split()
    pd.DataFrame({"prompt": [f"name a colour like {words[i % 8]} number {i}" for i in range(120)],
                  "response": [f"{words[(i + 1) % 8]} {i % 7}" for i in range(120)]}).to_csv(f, index=False)
    with pytest.raises(ConfigError, match="needs class answers"):
        Simulation(tiny_llm_cfg(**{"data.name": str(f), "task.clusters": 3, "run.metric": "macro_f1"}))
