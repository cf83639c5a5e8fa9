"""configs/<method>.toml is the default experiment with only [method] changed, and writes out every
setting of the method at its default (so the file documents them)."""

import tomllib
from pathlib import Path

import pytest

from hierfedlora.config import load_config
from hierfedlora.strategies.registry import get_strategy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "legend", "hierfedlora", "hierfavg", "ffalora"])
def test_config_file_differs_from_fedlora_only_in_method(method):
    path = ROOT / "configs" / f"{method}.toml"
    d, b = load_config(path).to_dict(), load_config(ROOT / "configs" / "fedlora.toml").to_dict()
    settings = get_strategy(method).settings()
    assert d["method"] == {"name": method, **settings.model_dump(mode="json", exclude_none=True)}
    assert {k: v for k, v in d.items() if k != "method"} == {k: v for k, v in b.items() if k != "method"}
    assert set(tomllib.loads(path.read_text())["method"]) == {"name", *settings.model_dump(exclude_none=True)}
