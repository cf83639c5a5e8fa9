import json

import numpy as np

import pytest
import tomli_w

from hierfedlora.cli import main


@pytest.fixture
def compare_cfg(synthetic_csv, tmp_path):
    raw = {
        "run": {"rounds": 2, "eval_every": 1, "checkpoint_every": 1, "progress": False},
        "model": {"name": "tiny-bert", "rank": 4, "alpha": 8.0},
        "data": {"name": str(synthetic_csv), "cache_dir": str(tmp_path / "cache")},
        "fleet": {"num_devices": 3, "participation": 1.0},
        "partition": {"kind": "iid"},
        "train": {"local_steps": 2, "batch_size": 8, "lr": 2e-2},
        "variants": {"fedlora-slow": {"name": "fedlora"}},
    }
    p = tmp_path / "cmp.toml"
    p.write_text(tomli_w.dumps(raw))
    return p


def test_compare_table_matches_summaries_reuses_runs_and_report_rebuilds(compare_cfg, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", str(compare_cfg), "--methods", "fedlora,fedlora-slow", "--seeds", "2", "--out", str(out),
            "--quiet", "--set", "train.lr=0.01"]
    assert main(args) == 0
    table = json.loads((out / "table.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert set(rows) == {"fedlora", "fedlora-slow"}
    finals = [json.loads((out / "fedlora" / f"seed{s}" / "summary.json").read_text())["final_acc"] for s in (0, 1)]
    assert rows["fedlora"]["score_mean"] == pytest.approx(sum(finals) / 2)
    assert rows["fedlora"]["seeds"] == 2 and rows["fedlora"]["speedup_vs_fedlora"] in (1.0, None)
    # the variant is the same method and setting: identical results, a sanity check of reuse of config
    assert rows["fedlora-slow"]["score_mean"] == rows["fedlora"]["score_mean"]
    report = (out / "report.md").read_text()
    assert f"{100 * rows['fedlora']['score_mean']:.2f}" in report
    for png in ("accuracy_vs_time.png", "accuracy_vs_traffic.png", "time_to_target.png"):
        assert (out / png).stat().st_size > 0

    stamp = (out / "fedlora" / "seed0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "reusing finished run" in capsys.readouterr().out
    assert (out / "fedlora" / "seed0" / "summary.json").stat().st_mtime_ns == stamp

    assert "(default rule: 95% of FedLoRA's mean final score)" in report

    (out / "table.json").unlink()
    assert main(["report", str(out)]) == 0
    assert json.loads((out / "table.json").read_text()) == table
    # the target rule says what it was: given, or without FedLoRA the lowest-scoring method's
    assert main(["report", str(out / "fedlora-slow"), "--out", str(tmp_path / "r1")]) == 0
    assert "of the lowest-scoring method's (no FedLoRA here) mean final score" in (tmp_path / "r1" / "report.md").read_text()
    assert main(["report", str(out), "--target", "0.5", "--out", str(tmp_path / "r2")]) == 0
    assert "Target: 50.00% (given)." in (tmp_path / "r2" / "report.md").read_text()


def test_compare_checks_every_method_before_it_trains_any(compare_cfg, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(compare_cfg), "--methods", "fedlora,nosuch", "--out", str(out), "--quiet"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert not (out / "fedlora").exists()
    assert main(["compare", str(compare_cfg), "--methods", " , ", "--out", str(out), "--quiet"]) == 2
    assert "names no method" in capsys.readouterr().err


def test_compare_honours_run_progress(compare_cfg, tmp_path, monkeypatch):
    import hierfedlora.experiment

    seen = []
    monkeypatch.setattr(hierfedlora.experiment, "run_experiment", lambda cfg, out, **kw: seen.append(kw["progress"]))
    # the config says progress = false and --quiet is not given: no run shows a progress bar
    main(["compare", str(compare_cfg), "--methods", "fedlora", "--out", str(tmp_path / "cmp")])
    assert seen == [False]


def test_report_without_runs_creates_nothing(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "rep")]) == 2
    assert "no finished runs" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_a_run_killed_while_exporting_is_not_finished_and_resumes(tiny_cfg, tmp_path, monkeypatch):
    import hierfedlora.adapter
    from hierfedlora.experiment import run_experiment

    cfg, out = tiny_cfg(**{"run.rounds": 2}), tmp_path / "r"
    real = hierfedlora.adapter.export_adapter

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(hierfedlora.adapter, "export_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, progress=False)
    rows = (out / "metrics.jsonl").read_text()
    assert not (out / "summary.json").exists()  # summary.json marks a finished run: compare would resume it
    monkeypatch.setattr(hierfedlora.adapter, "export_adapter", real)
    summary = run_experiment(cfg, out, resume=True, progress=False)
    assert (out / "summary.json").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert (out / "metrics.jsonl").read_text() == rows and summary["rounds"] == 2


# -- equal budgets and intervals ---------------------------------------------------------------
def _run(seed, evals, end=None):
    """A finished run whose evaluations are (sim_time_s, score) pairs."""
    from hierfedlora.compare import Run

    rows = [{"round": i, "sim_time_s": t, "bytes_up": 10 * i, "bytes_down": 10 * i, "bytes_wan": 15 * i,
             "bytes_lan": 5 * i, "test_acc": a} for i, (t, a) in enumerate(evals)]
    return Run("fedlora", seed, None, rows, {"sim_time_s": end if end is not None else evals[-1][0],
                                             "final_acc": evals[-1][1], "bytes_total": 20 * len(evals)})


def test_intervals_match_a_hand_computation():
    from hierfedlora.compare import interval

    m, sd, half = interval([0.7, 0.8, 0.9])
    # mean 0.8, sample std 0.1, t(0.975, 2 d.o.f.) = 4.302653 -> 4.302653 * 0.1 / sqrt(3)
    assert m == pytest.approx(0.8) and sd == pytest.approx(0.1) and half == pytest.approx(0.248414, abs=1e-6)
    assert interval([0.5]) == (0.5, 0.0, None)


def test_auto_budget_is_when_the_baseline_converged_in_every_seed():
    from hierfedlora.compare import auto_budget, converged_at

    # round 0 does not count; seed 0's evaluations at 20, 30, 40 s lie within one point from 40 s
    a = _run(0, [(0, 0.1), (10, 0.5), (20, 0.70), (30, 0.705), (40, 0.71), (50, 0.9)])
    b = _run(1, [(0, 0.1), (12, 0.6), (24, 0.7), (36, 0.702), (48, 0.703)])
    assert converged_at(a) == 40 and converged_at(b) == 48
    assert auto_budget([a, b]) == (48, [])
    swinging = _run(2, [(0, 0.1), (10, 0.5), (20, 0.6), (30, 0.5), (40, 0.6)], end=45)
    assert converged_at(swinging) is None and auto_budget([a, swinging]) == (45, [2])


def test_table_scores_at_the_budget_with_paired_differences():
    from hierfedlora.compare import Run, table

    fed = [_run(s, [(0, 0.1), (10, 0.5 + s / 10), (20, 0.6 + s / 10), (30, 0.9)]) for s in range(3)]
    other = [Run("fast", r.seed, None, [dict(x, sim_time_s=x["sim_time_s"] / 2) for x in r.rows], dict(r.summary))
             for r in fed]  # the same curve twice as fast: at 25 s it has its round-3 score
    rows = {r["method"]: r for r in table(fed + other, target=0.6, budget=25.0)}
    assert rows["fedlora"]["score_mean"] == pytest.approx(np.mean([0.6, 0.7, 0.8]))  # round 2 (20 s <= 25 s)
    assert rows["fast"]["score_mean"] == pytest.approx(0.9)
    diffs = [0.9 - 0.6, 0.9 - 0.7, 0.9 - 0.8]
    assert rows["fast"]["diff_vs_fedlora_mean"] == pytest.approx(np.mean(diffs))
    assert rows["fast"]["diff_vs_fedlora_ci95"] == pytest.approx(4.302653 * np.std(diffs, ddof=1) / np.sqrt(3), abs=1e-6)
    # target 0.6 within the budget: FedLoRA seed 0 at 20 s, seeds 1-2 at 10 s; "fast" at 5 s in seeds 1-2, 10 s in 0
    assert rows["fedlora"]["reached"] == "3/3" and rows["fedlora"]["time_to_target_s"] == pytest.approx(40 / 3)
    assert rows["fast"]["speedup_vs_fedlora"] == pytest.approx((40 / 3) / (20 / 3))
    assert rows["fedlora"]["wan_to_target_bytes"] == pytest.approx(np.mean([30, 15, 15]))


def test_compare_with_a_budget_stops_runs_there_and_extends_them_when_it_grows(compare_cfg, tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", str(compare_cfg), "--methods", "fedlora", "--seeds", "1", "--out", str(out), "--quiet",
            "--set", "run.rounds=20"]
    probe = tmp_path / "probe"
    assert main(["compare", str(compare_cfg), "--methods", "fedlora", "--out", str(probe), "--quiet",
                 "--set", "run.rounds=6"]) == 0
    times = [r["sim_time_s"] for r in map(json.loads, (probe / "fedlora" / "seed0" / "metrics.jsonl").read_text().splitlines())]
    small, large = (times[1] + times[2]) / 2, (times[4] + times[5]) / 2
    assert main(base + ["--budget", str(small)]) == 0
    run = out / "fedlora" / "seed0"
    first = json.loads((run / "summary.json").read_text())
    assert first["rounds"] == 2 and first["budget_reached"]
    table = json.loads((out / "table.json").read_text())
    assert table["budget_s"] == pytest.approx(small) and table["rows"][0]["score_mean"] == first["score_at_budget"]
    capsys.readouterr()
    assert main(base + ["--budget", str(large)]) == 0  # a larger budget continues the finished run
    assert "extending finished run" in capsys.readouterr().out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    probe_rows = [json.loads(x) for x in (probe / "fedlora" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["sim_time_s"] for r in rows] == times[:6] and rows[5]["test_acc"] == probe_rows[5]["test_acc"]
    assert main(["compare", str(compare_cfg), "--methods", "fedlora", "--out", str(out), "--budget", "-3"]) == 2
    assert main(["compare", str(compare_cfg), "--methods", "fedlora-slow", "--out", str(out), "--budget", "auto"]) == 2
    assert "add fedlora" in capsys.readouterr().err


def test_compare_budget_auto_runs_fedlora_first_and_scores_everyone_there(compare_cfg, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(compare_cfg), "--methods", "fedlora-slow,fedlora", "--seeds", "2", "--out", str(out),
                 "--quiet", "--budget", "auto", "--set", "run.rounds=8"]) == 0
    from hierfedlora.compare import auto_budget, load_runs

    runs = load_runs([out])
    fed = [r for r in runs if r.label == "fedlora"]
    budget, _ = auto_budget(fed)
    assert "budget:" in capsys.readouterr().out
    assert json.loads((out / "budget.json").read_text()) == {"budget_s": budget, "rule": "auto"}
    slow = [r for r in runs if r.label == "fedlora-slow"]
    # the variant is FedLoRA itself: stopped at the budget, its score there equals FedLoRA's
    assert all(r.summary["budget_s"] == budget and r.summary["sim_time_s"] >= budget for r in slow)
    import tomllib

    caps = [tomllib.loads((r.path / "config.toml").read_text())["run"]["rounds"] for r in slow]
    assert caps == [80, 80]  # a budgeted run's round cap: 10 x run.rounds (the budget stops it)
    rows = {r["method"]: r for r in json.loads((out / "table.json").read_text())["rows"]}
    assert rows["fedlora-slow"]["score_mean"] == rows["fedlora"]["score_mean"]
    assert rows["fedlora-slow"]["diff_vs_fedlora_mean"] == 0.0
    assert "Budget:" in (out / "report.md").read_text() and (out / "accuracy_vs_time.png").stat().st_size > 0


def test_ray_grid_gives_the_sequential_summaries_and_reuses_finished_runs(compare_cfg, tmp_path):
    pytest.importorskip("ray")
    common = ["--methods", "fedlora", "--seeds", "2", "--quiet", "--set", "train.threads=1"]
    assert main(["compare", str(compare_cfg), *common, "--out", str(tmp_path / "seq")]) == 0
    assert main(["compare", str(compare_cfg), *common, "--out", str(tmp_path / "ray"), "--jobs", "2"]) == 0
    for label in ("fedlora",):
        for seed in (0, 1):
            a, b = (json.loads((tmp_path / d / label / f"seed{seed}" / "summary.json").read_text()) for d in ("seq", "ray"))
            assert {k: v for k, v in a.items() if k != "wall_time_s"} == {k: v for k, v in b.items() if k != "wall_time_s"}
            ma, mb = ((tmp_path / d / label / f"seed{seed}" / "metrics.jsonl").read_text() for d in ("seq", "ray"))
            assert ma == mb
    stamp = (tmp_path / "ray" / "fedlora" / "seed1" / "summary.json").stat().st_mtime_ns
    assert main(["compare", str(compare_cfg), *common, "--out", str(tmp_path / "ray"), "--jobs", "2"]) == 0
    assert (tmp_path / "ray" / "fedlora" / "seed1" / "summary.json").stat().st_mtime_ns == stamp  # reused
    assert main(["compare", str(compare_cfg), *common, "--out", str(tmp_path / "ray"), "--jobs", "0"]) == 2
    assert json.loads((tmp_path / "ray" / "table.json").read_text()) == json.loads((tmp_path / "seq" / "table.json").read_text())


def test_a_variant_name_with_an_unquoted_dot_is_named_with_the_fix(tmp_path):
    """TOML reads [variants.hfl-ldp-0.1] as a table "1" inside "hfl-ldp-0": the error says to quote it,
    and the quoted name is a variant like any other."""
    from hierfedlora.compare import read_variants
    from hierfedlora.errors import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text('[variants.hfl-ldp-0.1]\nname = "hierfedlora"\n')
    with pytest.raises(ConfigError, match=r'quote it: \[variants."hfl-ldp-0.1"\]'):
        read_variants(bad)
    good = tmp_path / "good.toml"
    good.write_text('[variants."hfl-ldp-0.1"]\nname = "hierfedlora"\ngrouping_input = "ldp"\n')
    assert read_variants(good)[1] == {"hfl-ldp-0.1": {"name": "hierfedlora", "grouping_input": "ldp"}}
