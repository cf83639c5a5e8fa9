import json

import pytest

from hierfedlora.adapter import load_adapter
from hierfedlora.cli import main
from hierfedlora.engine import CHECKPOINT, CheckpointError, Simulation
from hierfedlora.experiment import run_experiment


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_run_learns_separable_task(tiny_cfg):
    cfg = tiny_cfg(**{"run.rounds": 12, "run.eval_every": 4, "train.local_steps": 4, "train.batch_size": 16})
    sim = Simulation(cfg)
    rows = sim.run()
    evals = [r for r in rows if "test_acc" in r]
    assert evals[0]["test_acc"] < 0.7  # untrained
    assert evals[-1]["test_acc"] >= 0.85
    assert rows[-1]["sim_time_s"] > 0 and all(b["sim_time_s"] > a["sim_time_s"] for a, b in zip(rows[1:], rows[2:]))


def test_bytes_equal_the_tensors_sent(tiny_cfg):
    cfg = tiny_cfg(**{"run.rounds": 1})
    sim = Simulation(cfg)
    row = sim.step()
    lay = sim.model.layout
    per_device = (sum(lay.params_per_rank(l) * cfg.model.rank for l in range(lay.num_layers)) + lay.head_params()) * 4
    assert row["bytes_up"] == row["bytes_down"] == cfg.fleet.num_devices * per_device
    # tiny-bert: 4 layers, query+value 32x32, rank 4: per layer 2·4·(32+32) = 512; head 32·2 + 2 = 66
    assert per_device == (4 * 512 + 66) * 4


def test_resume_equals_uninterrupted(tiny_cfg, tmp_path, interrupted_run):
    cfg = tiny_cfg(**{"run.rounds": 4, "run.eval_every": 2, "run.checkpoint_every": 2})
    run_experiment(cfg, tmp_path / "a", progress=False, export=False)
    interrupted_run(cfg, tmp_path / "b", after=3)
    assert len(read_rows(tmp_path / "b" / "metrics.jsonl")) == 4  # rounds 0..3 written; checkpoint at 2
    assert main(["run", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    assert read_rows(tmp_path / "a" / "metrics.jsonl") == read_rows(tmp_path / "b" / "metrics.jsonl")
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert {k: v for k, v in a.items() if k != "wall_time_s"} == {k: v for k, v in b.items() if k != "wall_time_s"}


def test_bad_checkpoints_and_overwrite_protection(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"run.rounds": 1})
    out = tmp_path / "r"
    run_experiment(cfg, out, progress=False, export=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_experiment(cfg, out, progress=False, export=False)
    sim = Simulation(tiny_cfg(**{"run.seed": 7}), out)
    with pytest.raises(CheckpointError, match="different configuration"):
        sim.load_checkpoint(out / CHECKPOINT)
    (out / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        Simulation(cfg, out).load_checkpoint(out / CHECKPOINT)
    assert (out / "metrics.jsonl").exists()  # results already written survive


def test_adapter_reloads_in_peft_to_same_accuracy(tiny_cfg, tmp_path, adapter_accuracy):
    cfg = tiny_cfg(**{"run.rounds": 3, "train.local_steps": 4})
    out = tmp_path / "r"
    summary = run_experiment(cfg, out, progress=False)
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "accuracy.png").exists()
    model, tok, labels = load_adapter(out / "adapter")
    sim = Simulation(cfg)  # same data and test split
    assert adapter_accuracy(model, sim.test_batches) == pytest.approx(summary["final_acc"], abs=1e-9)
    assert sorted(labels) == ["neg", "pos"]


def test_setup_errors_come_before_the_run_directory_and_overwrite_replaces_last(tiny_cfg, tmp_path, capsys):
    from hierfedlora.config import dump_config

    out = tmp_path / "r"
    # 9 groups of 4 devices: valid as a config, refused when the method is set up
    dump_config(tiny_cfg(**{"run.rounds": 1, "method.name": "hierfedlora", "method.num_groups": 9}), tmp_path / "bad.toml")
    assert main(["run", str(tmp_path / "bad.toml"), "--out", str(out), "--quiet"]) == 2
    assert "num_groups = 9 exceeds fleet.num_devices" in capsys.readouterr().err and not out.exists()
    cfg = tiny_cfg(**{"run.rounds": 1, "method.name": "hierfedlora", "method.num_groups": 2})
    run_experiment(cfg, out, progress=False, export=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"arms.png", "grouping.json", "summary.json"} <= set(before)
    # a bad config with --overwrite: refused at set-up, the old run untouched
    assert main(["run", str(tmp_path / "bad.toml"), "--out", str(out), "--overwrite", "--quiet"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # a good one replaces all of it: no arms.png or grouping.json of the old run is left behind
    run_experiment(tiny_cfg(**{"run.rounds": 1}), out, overwrite=True, progress=False, export=False)
    assert not (out / "arms.png").exists() and not (out / "grouping.json").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    with pytest.raises(FileExistsError, match="no run"):
        run_experiment(tiny_cfg(**{"run.rounds": 1}), tmp_path / "mine", overwrite=True, progress=False, export=False)
    assert (tmp_path / "mine" / "notes.txt").exists()
