"""The ServerApp's settings (hierfedlora.flower.server_app, run_config): run config keys and where
a relative experiment config is found."""

from __future__ import annotations

from hierfedlora.flower.run_config import ServerOptions
from hierfedlora.flower.server_app import resolve_config_path


def test_run_config_options(tmp_path):
    o = ServerOptions.from_run_config({"experiment-config": "configs/x.toml", "set": "run.rounds=3; train.lr=5e-4;",
                                       "run-dir": "/r", "round-timeout": 30, "resume": True})
    assert o.overrides == ("run.rounds=3", "train.lr=5e-4") and o.round_timeout == 30.0 and o.resume
    (tmp_path / "app" / "configs").mkdir(parents=True)
    (tmp_path / "app" / "configs" / "x.toml").write_text("")
    assert resolve_config_path("configs/x.toml", tmp_path / "app") == tmp_path / "app" / "configs" / "x.toml"
    assert resolve_config_path("", tmp_path) is None


def test_run_config_round_trips():
    """What a launcher writes (`to_run_config`) is what the ServerApp reads back."""
    o = ServerOptions(experiment_config="/x.toml", overrides=("run.rounds=3", "train.lr=5e-4"), run_dir="/r",
                      overwrite=True, round_timeout=30.0, node_wait=5.0, query_timeout=7.0)
    assert ServerOptions.from_run_config(o.to_run_config()) == o
    assert ServerOptions.from_run_config({}) == ServerOptions()
