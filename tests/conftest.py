"""Shared fixtures: a separable synthetic text task and a tiny-model config (fast, no packages)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hierfedlora.config import build_config
from synthetic import write_instructions, write_synthetic


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("data") / "syn.csv")


@pytest.fixture
def tiny_cfg(synthetic_csv, tmp_path):
    """Factory: a tiny-BERT config on the synthetic task, with overrides as dotted keys."""

    def make(**overrides):
        raw = {
            "run": {"rounds": 3, "eval_every": 1, "checkpoint_every": 1, "progress": False},
            "model": {"name": "tiny-bert", "rank": 4, "alpha": 8.0},
            "data": {"name": str(synthetic_csv), "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.1},
            "fleet": {"num_devices": 4, "participation": 1.0},
            "partition": {"kind": "iid"},
            "train": {"local_steps": 2, "batch_size": 8, "lr": 2e-2},
        }
        sets = [f"{k}={v!r}" if not isinstance(v, str) else f'{k}="{v}"' for k, v in overrides.items()]
        sets = [s.replace("True", "true").replace("False", "false") for s in sets]
        return build_config(raw, sets)

    return make


@pytest.fixture
def adapter_accuracy():
    """accuracy(model, batches): test accuracy of a loaded model (e.g. an exported adapter in PEFT)
    over pre-collated batches, to set beside the run's own `final_acc`."""
    import torch

    def accuracy(model, batches) -> float:
        correct = n = 0
        with torch.no_grad():
            for batch in batches:
                pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
                correct += int((pred == batch["labels"]).sum())
                n += len(pred)
        return correct / n

    return accuracy


@pytest.fixture(scope="session")
def instruct_csv(tmp_path_factory) -> Path:
    return write_instructions(tmp_path_factory.mktemp("idata") / "inst.csv")


@pytest.fixture
def tiny_llm_cfg(instruct_csv, tiny_cfg):
    """Factory: `tiny_cfg` as causal-LM instruction tuning of tiny-llama on `instruct_csv`."""

    def make(**overrides):
        base = {"task.kind": "instruction", "model.name": "tiny-llama", "data.name": str(instruct_csv),
                "model.max_length": 48, "task.max_new_tokens": 4, "train.eval_batch_size": 16}
        return tiny_cfg(**{**base, **overrides})

    return make


@pytest.fixture
def interrupted_run():
    """Run `cfg` into a fresh run directory `out` as `hierfedlora run` would, and kill it (an
    exception from the progress callback) once round `after` is written."""
    from hierfedlora.engine import Simulation
    from hierfedlora.experiment import prepare_run_dir

    class Killed(Exception):
        pass

    def kill_after(row):
        if row["round"] == state["after"]:
            raise Killed

    state = {}

    def run(cfg, out: Path, after: int) -> None:
        state["after"] = after
        prepare_run_dir(cfg, out, overwrite=False)
        with pytest.raises(Killed):
            Simulation(cfg, out).run(kill_after)

    return run
