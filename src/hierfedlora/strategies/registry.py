"""Method registry: every module in `hierfedlora.strategies` that defines NAME, Settings and
Strategy is a method, so adding one (FFA-LoRA, FedSA-LoRA, ...) is adding one module (SPEC §2)."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel

import hierfedlora.strategies as _pkg


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    settings: type[BaseModel]
    strategy: type
    module: str


@cache
def available() -> dict[str, StrategyEntry]:
    out = {}
    for info in pkgutil.iter_modules(_pkg.__path__):
        if info.name in ("base", "registry") or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{_pkg.__name__}.{info.name}")
        if all(hasattr(mod, a) for a in ("NAME", "Settings", "Strategy")):
            out[mod.NAME] = StrategyEntry(mod.NAME, mod.Settings, mod.Strategy, mod.__name__)
    return out


def get_strategy(name: str) -> StrategyEntry:
    methods = available()
    if name not in methods:
        close = difflib.get_close_matches(name, list(methods), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown method.name '{name}'.{hint} Available: {', '.join(sorted(methods))}.")
    return methods[name]
