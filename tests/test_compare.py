import json

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
    assert rows["fedlora"]["final_acc_mean"] == pytest.approx(sum(finals) / 2)
    assert rows["fedlora"]["seeds"] == 2 and rows["fedlora"]["speedup_vs_fedlora"] in (1.0, None)
    # the variant is the same method and setting: identical results, a sanity check of reuse of config
    assert rows["fedlora-slow"]["final_acc_mean"] == rows["fedlora"]["final_acc_mean"]
    report = (out / "report.md").read_text()
    assert f"{100 * rows['fedlora']['final_acc_mean']:.2f}" in report
    for png in ("accuracy_vs_time.png", "accuracy_vs_traffic.png", "time_to_target.png"):
        assert (out / png).stat().st_size > 0

    stamp = (out / "fedlora" / "seed0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "reusing finished run" in capsys.readouterr().out
    assert (out / "fedlora" / "seed0" / "summary.json").stat().st_mtime_ns == stamp

    (out / "table.json").unlink()
    assert main(["report", str(out)]) == 0
    assert json.loads((out / "table.json").read_text()) == table


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
