"""Method registry: every module in `hierfedlora.strategies` that defines NAME, Settings and
Strategy is a method, so adding one (FedSA-LoRA, FedRA, ...) is adding one module (docs/design.md §2).

A method that needs the device to do more than minimise the task loss declares it in the module's
`TRAINER_OPTIONS` ({name in `DevicePlan.options`: loss term}); `trainer_options` collects them for
the trainer, which applies the term of each option a plan names."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel

import hierfedlora.strategies as _pkg

from hierfedlora.errors import ConfigError


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    settings: type[BaseModel]
    strategy: type
    module: str
    trainer_options: dict[str, Callable]


@cache
def available() -> dict[str, StrategyEntry]:
    out = {}
    for info in pkgutil.iter_modules(_pkg.__path__):
        if info.name in ("base", "registry") or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{_pkg.__name__}.{info.name}")
        names = vars(mod)
        if all(a in names for a in ("NAME", "Settings", "Strategy")):
            out[mod.NAME] = StrategyEntry(mod.NAME, mod.Settings, mod.Strategy, mod.__name__,
                                          dict(names.get("TRAINER_OPTIONS", {})))
    return out


@cache
def trainer_options() -> dict[str, Callable]:
    """Every method's declared trainer options, by name (names are unique across methods)."""
    out: dict[str, Callable] = {}
    for entry in available().values():
        for name, term in entry.trainer_options.items():
            if name in out:
                raise ValueError(f"trainer option '{name}' is declared by two methods")
            out[name] = term
    return out


def get_strategy(name: str) -> StrategyEntry:
    methods = available()
    if name not in methods:
        close = difflib.get_close_matches(name, list(methods), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method.name '{name}'.{hint} Available: {', '.join(sorted(methods))}.")
    return methods[name]
