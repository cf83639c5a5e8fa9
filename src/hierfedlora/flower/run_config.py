"""What the ServerApp and whoever submits it agree on: the Flower run config and the files a Flower
run adds to its run directory.

`hierfedlora flower` (`command`) and `deploy.LocalFederation` build run configs and watch the
status file, and the ServerApp (`server_app`) reads the one and writes the other. The contract lives
here, in a module that imports neither Flower nor torch, so each side names every key and file once
and a launcher does not load the ServerApp to learn them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hierfedlora.errors import ConfigError

NODES_LOG = "flower_nodes.jsonl"  # node events and per-call participation (`executor`)
TRAFFIC_LOG = "flower_traffic.jsonl"  # per job: the meter's bytes beside Flower's (`executor.TrafficRow`)
TRAFFIC_SUMMARY = "flower_traffic_summary.json"  # the totals of TRAFFIC_LOG (`server_app`)
STATUS_FILE = "flower_status.json"  # written last by the ServerApp: {"status": "completed" | "failed", ...}
RUN_RECORD = "flower_run.json"  # Flower's own record of the run from `flwr ls` (`deploy`)


@dataclass(frozen=True)
class SecAggOptions:
    """Flower's SecAgg+ under `fleet.secure_aggregation` (`secagg`): `shares`, the fraction of an
    aggregator's devices each device shares its keys with; `threshold`, the fraction of those shares
    that rebuild a dropped device's masks; `clip`, the bound c on each weighted update entry."""

    shares: float = 1.0
    threshold: float = 0.67
    clip: float = 4.0


@dataclass(frozen=True)
class ServerOptions:
    """The ServerApp's settings, one field per run config key (``[tool.flwr.app.config]``)."""

    experiment_config: str = ""
    overrides: tuple[str, ...] = ()
    run_dir: str = "runs/flower"
    overwrite: bool = False
    resume: bool = False
    round_timeout: float = 600.0
    node_wait: float = 120.0
    query_timeout: float = 120.0
    secagg: SecAggOptions = SecAggOptions()

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> "ServerOptions":
        """Options from a Flower run config; missing keys take the defaults above."""
        d = cls()
        sets = tuple(s.strip() for s in str(rc.get("set", "")).split(";") if s.strip())
        return cls(experiment_config=str(rc.get("experiment-config", d.experiment_config)), overrides=sets,
                   run_dir=str(rc.get("run-dir", d.run_dir)), overwrite=_flag(rc, "overwrite", d.overwrite),
                   resume=_flag(rc, "resume", d.resume), round_timeout=_seconds(rc, "round-timeout", d.round_timeout),
                   node_wait=_seconds(rc, "node-wait", d.node_wait),
                   query_timeout=_seconds(rc, "query-timeout", d.query_timeout),
                   secagg=SecAggOptions(shares=_fraction(rc, "secagg-shares", d.secagg.shares),
                                        threshold=_fraction(rc, "secagg-threshold", d.secagg.threshold),
                                        clip=_seconds(rc, "secagg-clip", d.secagg.clip, "a positive bound")))

    def to_run_config(self) -> dict[str, Any]:
        """The run config that `from_run_config` reads back as these options."""
        return {"experiment-config": self.experiment_config, "set": ";".join(self.overrides), "run-dir": self.run_dir,
                "overwrite": self.overwrite, "resume": self.resume, "round-timeout": self.round_timeout,
                "node-wait": self.node_wait, "query-timeout": self.query_timeout,
                "secagg-shares": self.secagg.shares, "secagg-threshold": self.secagg.threshold,
                "secagg-clip": self.secagg.clip}


def _seconds(rc: dict[str, Any], key: str, default: float, what: str = "a positive number of seconds") -> float:
    """A positive number (of seconds, unless `what` says otherwise) from the run config."""
    v = rc.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok:
        raise ConfigError(f"run config '{key}' = {v!r}: give {what} (e.g. {key}={default:g}).")
    return float(v)


def _fraction(rc: dict[str, Any], key: str, default: float) -> float:
    """A number in (0, 1] from the run config."""
    v = _seconds(rc, key, default, "a fraction in (0, 1]")
    if v > 1:
        raise ConfigError(f"run config '{key}' = {v!r}: give a fraction in (0, 1] (e.g. {key}={default:g}).")
    return v


def _flag(rc: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false run config value (not a string: "false" would read as true)."""
    v = rc.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"run config '{key}' = {v!r}: give true or false.")
    return v
