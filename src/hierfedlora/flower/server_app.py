"""The server side of a Flower deployment: a ServerApp that drives any of our strategies.

It runs the very experiment `hierfedlora run` runs — same config file, same `Simulation` (strategy,
server state, clock, traffic meter, evaluation, checkpoints, outputs) — except that devices' local
work goes to SuperNodes through `FlowerExecutor`. Settings come from the Flower run config
(``[tool.flwr.app.config]`` in pyproject.toml, overridable with ``flwr run --run-config``; the keys
are `run_config.ServerOptions`):

- ``experiment-config``: the experiment TOML ("" = built-in defaults); a relative path is looked up
  in the ServerApp's working directory, then inside the Flower App;
- ``set``: ``key=value`` overrides separated by ``;``;
- ``run-dir``, ``overwrite``, ``resume``: the run directory, as in `hierfedlora run`;
- ``round-timeout``, ``node-wait``, ``query-timeout``: seconds (see `FlowerExecutor`);
- ``secagg-shares``, ``secagg-threshold``, ``secagg-clip``: Flower's SecAgg+ under
  ``fleet.secure_aggregation`` (`run_config.SecAggOptions`, `flower.secagg`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hierfedlora.config import ExperimentConfig
from hierfedlora.flower.run_config import STATUS_FILE, TRAFFIC_SUMMARY, ServerOptions

app = ServerApp()


def _app_dir(grid: Grid) -> Path | None:
    try:
        from flwr.common.config import get_project_dir

        run = grid.run
        return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)
    except Exception:  # noqa: BLE001 - only a fallback location for relative config paths
        return None


def resolve_config_path(path: str, app_dir: Path | None) -> Path | None:
    """Where the experiment config is: as given if it exists here, else inside the Flower App."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or app_dir is None:
        return p
    return app_dir / p if (app_dir / p).exists() else p


def _experiment(grid: Grid, opts: ServerOptions, out: Path) -> tuple[ExperimentConfig, bool]:
    """(config, resume): a resumed run takes its own config; `resume` without a run in `out` starts
    afresh, since a launcher asks for it before it knows whether the server ever wrote one."""
    from hierfedlora.config import load_config
    from hierfedlora.experiment import resume_config

    if opts.resume and (out / "config.toml").is_file():
        return resume_config(out, None, []), True
    return load_config(resolve_config_path(opts.experiment_config, _app_dir(grid)), list(opts.overrides)), False


def _write_traffic(out: Path, summary: dict[str, Any], traffic: dict[str, Any]) -> None:
    """The traffic totals beside the run, and their headline figures in `summary.json`."""
    (out / TRAFFIC_SUMMARY).write_text(json.dumps(traffic, indent=2))
    summary["flower"] = {k: traffic[k] for k in ("meter_bytes", "flower_tensor_bytes", "flower_wire_bytes",
                                                 "wire_over_meter", "nodes")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def run_on_grid(grid: Grid, opts: ServerOptions, log=print) -> dict[str, Any]:
    """Run one experiment with its devices on the grid's SuperNodes; returns the summary."""
    from hierfedlora.engine import local_executor
    from hierfedlora.experiment import run_experiment
    from hierfedlora.flower.executor import FlowerExecutor

    out = Path(opts.run_dir).expanduser()
    cfg, resume = _experiment(grid, opts, out)
    made: list[FlowerExecutor] = []

    def executor(sim) -> FlowerExecutor:  # evaluation stays in this process, on the server's model
        made.append(FlowerExecutor(grid, cfg, out, local_executor(sim), round_timeout=opts.round_timeout,
                                   node_wait=opts.node_wait, query_timeout=opts.query_timeout, resume=resume,
                                   secagg=opts.secagg, log=log))
        return made[0]

    log(f"[flower] {cfg.method.get('name', 'fedlora')}: {cfg.fleet.num_devices} devices, {cfg.run.rounds} rounds -> {out}")
    summary = run_experiment(cfg, out, overwrite=opts.overwrite, resume=resume, progress=False, executor=executor)
    _write_traffic(out, summary, made[0].traffic_summary())
    log(f"[flower] done: {json.dumps({k: summary.get(k) for k in ('final_acc', 'rounds', 'wall_time_s')})}")
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment and leave `STATUS_FILE` last, so a launcher watching it knows the end."""
    opts = ServerOptions.from_run_config(dict(context.run_config))
    status = Path(opts.run_dir).expanduser() / STATUS_FILE
    status.unlink(missing_ok=True)
    try:
        summary = run_on_grid(grid, opts)
    except BaseException as e:
        if status.parent.is_dir():
            status.write_text(json.dumps({"status": "failed", "error": f"{type(e).__name__}: {e}"}))
        raise
    status.write_text(json.dumps({"status": "completed", "final_acc": summary.get("final_acc"),
                                  "rounds": summary.get("rounds")}))
