"""`hierfedlora flower`: run one experiment across Flower SuperNode processes on this machine.

    hierfedlora flower CONFIG.toml [--set k=v ...] [--out DIR] [--supernodes N] [--tls] [--auth]
    hierfedlora flower --resume DIR
    hierfedlora flower --serve [--supernodes N] [--tls] [--auth] [--work DIR]

It starts a SuperLink and N SuperNodes (device K's node has ``--node-config partition-id=K``) on
127.0.0.1, submits the experiment with ``flwr run``, prints a line per round, and stops every process
when the run ends (or fails, or is interrupted). ``--serve`` only starts the federation and keeps
it up for your own ``flwr run``. See docs/flower.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hierfedlora.config import ExperimentConfig


def add_arguments(f: argparse.ArgumentParser) -> None:
    """`hierfedlora flower`'s own arguments (the CLI adds those of every experiment command)."""
    f.add_argument("--supernodes", type=int, help="SuperNodes to start, playing devices 0..N-1 (default: fleet.num_devices)")
    f.add_argument("--tls", action="store_true", help="TLS between every process, with a CA and certificate generated for 127.0.0.1")
    f.add_argument("--auth", action="store_true", help="SuperNode authentication: a key pair per node, registered with the SuperLink (needs --tls)")
    f.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for a training call's devices (default 600)")
    f.add_argument("--node-wait", type=float, default=300.0, help="seconds to wait for all SuperNodes at the start (default 300)")
    f.add_argument("--work", help="federation folder: certificates, keys, logs, Flower homes (default: <out>.flower)")
    f.add_argument("--serve", action="store_true", help="start the federation and keep it up for `flwr run` until Ctrl-C")
    f.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="give up on the run after this many seconds")
    f.set_defaults(func=cmd_flower)


def _progress(out: Path, seen: list[int]) -> None:
    """Print the metrics rows the ServerApp wrote since the last call."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows[seen[0]:]:
        acc = f" acc {100 * row['test_acc']:.1f}%" if "test_acc" in row else ""
        drop = f" dropped {row['dropped']}" if row.get("dropped") else ""
        print(f"round {row['round']}: {row.get('participants', 0)} devices{acc}{drop}", flush=True)
    seen[0] = len(rows)


def cmd_flower(args: argparse.Namespace) -> int:
    from hierfedlora.config import ConfigError

    if args.auth and not args.tls:
        raise ConfigError("--auth needs --tls (Flower only authenticates SuperNodes over TLS).")
    if args.supernodes is not None and args.supernodes < 1:
        raise ConfigError(f"--supernodes {args.supernodes}: start at least 1 SuperNode (default: fleet.num_devices).")
    for flag, v in (("--round-timeout", args.round_timeout), ("--node-wait", args.node_wait), ("--timeout", args.timeout)):
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{flag} {v:g}: give a positive number of seconds.")
    return _serve(args) if args.serve else _run(args)


def _serve(args: argparse.Namespace) -> int:
    """`--serve`: start the federation and keep it up for the user's own `flwr run` until Ctrl-C."""
    from hierfedlora.flower.deploy import LocalFederation

    n = args.supernodes or 2
    work = Path(args.work or "runs/flower-federation")
    with LocalFederation(work, n, tls=args.tls, auth=args.tls and args.auth) as fed:
        fed.start()
        print(f"SuperLink {fed.address} ({'TLS' if args.tls else 'insecure'}), {n} SuperNodes playing devices "
              f"0..{n - 1}; logs in {work / 'logs'}.\nRun an experiment on it (from the project directory):\n"
              f"  FLWR_HOME={fed.cli_home} flwr run . cluster --run-config "
              f"'experiment-config=\"configs/fedlora.toml\" run-dir=\"runs/fedlora-flower\" set=\"fleet.num_devices={n}\"'\n"
              "Ctrl-C stops the federation.", flush=True)
        try:
            while fed.superlink.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    return 0


def _experiment(args: argparse.Namespace) -> tuple[ExperimentConfig, Path]:
    """(config, run directory) by the rules every experiment command follows (`experiment`)."""
    from hierfedlora.experiment import select_run

    cfg, out = select_run(args.config, args.set, args.out, args.resume, args.overwrite, suffix="-flower")
    return cfg, out.resolve()


def _run_config(args: argparse.Namespace, cfg: ExperimentConfig, out: Path, work: Path) -> dict[str, Any]:
    """The ServerApp's run config: the resolved experiment goes as a file in `work`, so the
    ServerApp reads exactly what this command resolved (overrides included)."""
    from hierfedlora.config import dump_config
    from hierfedlora.flower.run_config import ServerOptions

    work.mkdir(parents=True, exist_ok=True)
    experiment = work / "experiment.toml"
    dump_config(cfg, experiment)
    return ServerOptions(experiment_config=str(experiment.resolve()), run_dir=str(out), overwrite=bool(args.overwrite),
                         resume=bool(args.resume), round_timeout=float(args.round_timeout),
                         node_wait=float(args.node_wait),
                         query_timeout=float(max(args.round_timeout, 120.0))).to_run_config()


def _run(args: argparse.Namespace) -> int:
    """Start the federation, run the experiment on it, stop it, and print the summary."""
    from hierfedlora.flower.deploy import FederationError, LocalFederation

    cfg, out = _experiment(args)
    work = Path(args.work) if args.work else out.with_name(out.name + ".flower")
    n = args.supernodes or cfg.fleet.num_devices
    if n < cfg.fleet.num_devices:
        print(f"note: {n} SuperNodes for {cfg.fleet.num_devices} devices; devices {n}..{cfg.fleet.num_devices - 1} "
              "have no node and count as dropped every round.")
    run_config = _run_config(args, cfg, out, work)
    t0 = time.perf_counter()
    seen = [0]
    try:
        with LocalFederation(work, n, tls=args.tls, auth=args.auth) as fed:
            fed.start()
            status = fed.run(run_config, timeout=args.timeout, on_poll=lambda: _progress(out, seen))
            _progress(out, seen)
    except FederationError as e:
        print(f"error: {e} (logs: {work / 'logs'})")
        return 1
    if status != "finished:completed" or not (out / "summary.json").exists():
        print(f"error: the Flower run ended as '{status}'; see {work / 'logs' / 'superlink.log'}")
        return 1
    _report(out, time.perf_counter() - t0)
    return 0


def _report(out: Path, wall_s: float) -> None:
    """The summary table, and the traffic as our meter, the records and Flower's SuperLink counted it."""
    from hierfedlora.experiment import print_summary
    from hierfedlora.flower.run_config import RUN_RECORD, TRAFFIC_LOG

    summary = json.loads((out / "summary.json").read_text())
    print_summary(summary, out)
    fl = summary.get("flower", {})
    print(f"wall clock {wall_s:.0f} s (ServerApp {summary.get('wall_time_s')} s); traffic: meter "
          f"{fl.get('meter_bytes', 0) / 1e6:.3f} MB, Flower tensors {fl.get('flower_tensor_bytes', 0) / 1e6:.3f} MB, "
          f"serialized {fl.get('flower_wire_bytes', 0) / 1e6:.3f} MB ({TRAFFIC_LOG})")
    if (out / RUN_RECORD).exists():
        net = json.loads((out / RUN_RECORD).read_text()).get("network-traffic", {})
        print(f"Flower's SuperLink counted {net.get('total-bytes', 0) / 1e6:.3f} MB on its Fleet API for this run "
              f"(all messages, with protocol overhead; {RUN_RECORD})")
