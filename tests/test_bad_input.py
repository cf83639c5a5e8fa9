"""Bad input through the command line, as a user meets it: every case runs `hierfedlora ...` in a
subprocess and must fail with one `error:` line that names the offending key, file or value, a
non-zero exit status, no traceback, no new run directory, and every earlier run left byte for byte
as it was (issue: "every bad input gets a named error").

A case is its arguments (with placeholders for the files the fixture made) and the words its
message must contain; `make` builds what a case damages in its own folder, so the shared earlier
run stays untouched. The cases run two at a time (one per core) in one fixture; each test then
checks its own case's outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import bad_data
from synthetic import write_instructions, write_synthetic

TINY = """\
[run]
rounds = 2
eval_every = 1
checkpoint_every = 1
progress = false

[model]
name = "tiny-bert"
rank = 4
alpha = 8.0

[data]
name = "{data}"
cache_dir = "{root}/cache"
val_fraction = 0.1

[fleet]
num_devices = 4
participation = 1.0

[partition]
kind = "iid"

[train]
local_steps = 2
batch_size = 8
lr = 0.02
workers = 1
"""


@dataclass
class Case:
    id: str
    args: list[str]
    says: tuple[str, ...]  # every one appears in the output
    make: Callable[[Path, dict], dict] | None = None  # (case folder, paths) -> more placeholders


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "hierfedlora.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# A command line run in a child forked from a process that has imported the package once: each case
# is its own process with its own exit status and output, as `python -m hierfedlora.cli` would be,
# without paying the torch/transformers imports once per case (most of a case's time). Nothing has
# run a torch operation in the parent, so no thread pool is forked half-way.
# `test_forked_command_lines_match_fresh_interpreters` checks the two agree.
FORK_SERVER = r"""
import json, os, sys, traceback
import hierfedlora.cli as cli
import hierfedlora.adapter, hierfedlora.compare, hierfedlora.engine  # what most cases import anyway
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(req["cwd"])
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdin = open(os.devnull)
        sys.argv = ["hierfedlora", *req["args"]]
        try:
            rc = cli.main(req["args"])
        except SystemExit as e:  # as the interpreter treats it: None is 0, text is printed and 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkedCLI:
    """A process that has imported hierfedlora and forks one child per command line."""

    def __init__(self, cwd: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
        log = cwd / "cli-output.txt"
        self.proc.stdin.write(json.dumps({"args": args, "cwd": str(cwd), "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        out = log.read_text(errors="replace")
        log.unlink()
        return subprocess.CompletedProcess(args, rc, out, "")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the run lock's file aside: an flock leaves it unchanged)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


# -- what some cases build in their own folder ---------------------------------------------------
def copy_done(folder: Path, paths: dict) -> dict:
    """A copy of the finished run, free to damage."""
    run = folder / "run"
    shutil.copytree(paths["done"], run)
    return {"run": str(run)}


def unfinished(folder: Path, paths: dict) -> dict:
    """A copy of the finished run without summary.json: --resume loads its checkpoint."""
    p = copy_done(folder, paths)
    (Path(p["run"]) / "summary.json").unlink()
    return p


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def damaged_checkpoint(blob):
    def make(folder: Path, paths: dict) -> dict:
        import torch

        p = unfinished(folder, paths)
        ck = Path(p["run"]) / "checkpoint.pt"
        if isinstance(blob, bytes):
            ck.write_bytes(blob)
        elif blob == "truncated":
            ck.write_bytes(ck.read_bytes()[:1000])
        elif blob == "no-fingerprint":
            d = torch.load(ck, weights_only=False)
            del d["fingerprint"]
            torch.save(d, ck)
        else:
            torch.save(blob, ck)
        return p
    return make


def run_edited(old: str, new: str) -> Callable:
    def make(folder: Path, paths: dict) -> dict:
        p = unfinished(folder, paths)
        edit(Path(p["run"]) / "config.toml", old, new)
        return p
    return make


def changed_data(folder: Path, paths: dict) -> dict:
    """A run over its own data file, interrupted, and the file rewritten under the same name."""
    data = write_synthetic(folder / "mine.csv", n=200, seed=0)
    cfg = folder / "mine.toml"
    cfg.write_text(TINY.format(data=data, root=folder).replace("rounds = 2", "rounds = 1"))
    r = run_cli(["run", str(cfg), "--out", str(folder / "run")], folder)
    assert r.returncode == 0, r.stderr
    (folder / "run" / "summary.json").unlink()
    write_synthetic(data, n=200, seed=1)
    return {"run": str(folder / "run")}


def damaged_adapter(fn: Callable[[Path], None]) -> Callable:
    def make(folder: Path, paths: dict) -> dict:
        p = copy_done(folder, paths)
        fn(Path(p["run"]) / "adapter")
        return p
    return make


def write_file(name: str, text: str | bytes) -> Callable:
    def make(folder: Path, paths: dict) -> dict:
        f = folder / name
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        return {"file": str(f)}
    return make


def fleet_file(text: str) -> Callable:
    return write_file("fleet.toml", text)


def locked(case_make: Callable | None = None, target: str = "done") -> Callable:
    """Hold the run lock of `target` (a placeholder) from this process while the case runs."""
    def make(folder: Path, paths: dict) -> dict:
        from filelock import FileLock

        more = case_make(folder, paths) if case_make else {}
        d = Path({**paths, **more}[target])
        lock = FileLock(d / ".lock", timeout=0)
        lock.acquire()
        more["_lock"] = lock
        return more
    return make


def not_a_run(folder: Path, paths: dict) -> dict:
    d = folder / "notes"
    d.mkdir()
    (d / "todo.txt").write_text("mine")
    return {"dir": str(d)}


def variants(text: str) -> Callable:
    def make(folder: Path, paths: dict) -> dict:
        f = folder / "cmp.toml"
        f.write_text(Path(paths["cfg"]).read_text() + "\n" + text)
        return {"file": str(f)}
    return make


def damaged_metrics(folder: Path, paths: dict) -> dict:
    p = copy_done(folder, paths)
    with open(Path(p["run"]) / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "test_acc": \n')
    return p


def damaged_summary(folder: Path, paths: dict) -> dict:
    p = copy_done(folder, paths)
    (Path(p["run"]) / "summary.json").write_text("{not json")
    return p


R = ["run", "{cfg}", "--out", "{new}"]  # a run of the tiny config into a fresh directory


def S(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


CASES = [
    # -- settings given with --set ------------------------------------------------------------
    Case("device-gpu", R + S('train.device="gpu"'), ("train.device", "gpu")),
    Case("device-cuda-on-cpu", R + S('train.device="cuda"'), ("train.device", "cuda")),
    Case("device-cuda-index", R + S('train.device="cuda:3"'), ("train.device", "cuda:3")),
    Case("method-name-int", R + S("method.name=5"), ("method.name",)),
    Case("method-unknown", R + S('method.name="fedloar"'), ("fedloar", "fedlora")),
    Case("model-unknown", R + S('model.name="no-such-model"'), ("model.name", "no-such-model")),
    Case("model-empty-folder", R + S('model.name="{root}"'), ("model.name", "tokenizer")),
    Case("max-length-beyond-positions", R + S("model.max_length=200"), ("model.max_length", "128")),
    Case("max-length-too-small", R + S("model.max_length=4"), ("model.max_length",)),
    Case("rank-zero", R + S("model.rank=0"), ("model.rank",)),
    Case("rank-string", R + S('model.rank="3"'), ("model.rank",)),
    Case("alpha-inf", R + S("model.alpha=inf"), ("model.alpha", "finite")),
    Case("alpha-negative", R + S("model.alpha=-1.0"), ("model.alpha",)),
    Case("lora-dropout-one", R + S("model.lora_dropout=1.0"), ("model.lora_dropout",)),
    Case("target-modules-missing", R + S('model.target_modules=["nope"]'), ("nope",)),
    Case("lr-inf", R + S("train.lr=inf"), ("train.lr", "finite")),
    Case("lr-nan", R + S("train.lr=nan"), ("train.lr",)),
    Case("lr-zero", R + S("train.lr=0.0"), ("train.lr",)),
    Case("batch-size-zero", R + S("train.batch_size=0"), ("train.batch_size",)),
    Case("local-steps-yes", R + S("train.local_steps=yes"), ("train.local_steps",)),
    Case("workers-negative", R + S("train.workers=-1"), ("train.workers",)),
    Case("rounds-true", R + S("run.rounds=true"), ("run.rounds",)),
    Case("rounds-zero", R + S("run.rounds=0"), ("run.rounds",)),
    Case("seed-negative", R + S("run.seed=-1"), ("run.seed",)),
    Case("seed-huge", R + S("run.seed=1099511627776"), ("run.seed",)),
    Case("seed-bool", R + S("run.seed=true"), ("run.seed",)),
    Case("eval-every-zero", R + S("run.eval_every=0"), ("run.eval_every",)),
    Case("budget-negative", R + S("run.budget_s=-5.0"), ("run.budget_s",)),
    Case("target-above-one", R + S("run.target_acc=2.0"), ("run.target_acc",)),
    Case("progress-string", R + S('run.progress="no"'), ("run.progress",)),
    Case("devices-zero", R + S("fleet.num_devices=0"), ("fleet.num_devices",)),
    Case("devices-beyond-fleet", R + S("fleet.num_devices=100"), ("fleet.num_devices", "80")),
    Case("participation-zero", R + S("fleet.participation=0.0"), ("fleet.participation",)),
    Case("participation-above-one", R + S("fleet.participation=1.5"), ("fleet.participation",)),
    Case("dropout-one", R + S("fleet.dropout=1.0"), ("fleet.dropout",)),
    Case("fleet-unknown", R + S('fleet.name="jetson81"'), ("jetson81",)),
    Case("fleet-file-not-toml", R + S('fleet.name="{file}"'), ("fleet.toml",), make=fleet_file("[[device]\nflops=")),
    Case("fleet-file-no-devices", R + S('fleet.name="{file}"'), ("fleet.toml", "[[device]]"), make=fleet_file("x = 1\n")),
    Case("fleet-file-unknown-key", R + S('fleet.name="{file}"'), ("fleet.toml", "flopz"),
         make=fleet_file('[[device]]\nkind = "a"\nflopz = 1e12\nmemory_gb = 8\nwan_up_mbps = 10\n')),
    Case("fleet-file-missing-key", R + S('fleet.name="{file}"'), ("fleet.toml", "memory_gb"),
         make=fleet_file('[[device]]\nkind = "a"\nflops = 1e12\nwan_up_mbps = 10\n')),
    Case("fleet-file-negative", R + S('fleet.name="{file}"'), ("fleet.toml", "> 0"),
         make=fleet_file('[[device]]\nkind = "a"\nflops = -1e12\nmemory_gb = 8\nwan_up_mbps = 10\n')),
    Case("aggregator-unknown", R + S('fleet.aggregator="cloud"'), ("fleet.aggregator",)),
    Case("bytes-per-param", R + S("fleet.bytes_per_param=3"), ("fleet.bytes_per_param",)),
    Case("partition-kind", R + S('partition.kind="weird"'), ("partition.kind",)),
    Case("partition-alpha-zero", R + S("partition.alpha=0.0"), ("partition.alpha",)),
    Case("partition-alpha-inf", R + S("partition.alpha=inf"), ("partition.alpha",)),
    Case("classes-per-device", R + S('partition.kind="pathological"', "partition.classes_per_device=5"),
         ("classes_per_device",)),
    Case("task-kind", R + S('task.kind="regression"'), ("task.kind",)),
    Case("task-encoder-for-instruction", R + S('task.kind="instruction"', 'data.name="{file}"'), ("tiny-bert", "decoder"),
         make=lambda f, p: {"file": str(write_instructions(f / "inst.csv", n=60))}),
    Case("task-answers", R + S('task.answers="maybe"'), ("task.answers",)),
    Case("section-typo", R + S("trian.lr=0.1"), ("trian", "train")),
    Case("key-typo", R + S("train.lrr=0.1"), ("lrr", "lr")),
    Case("set-without-value", R + ["--set", "train.lr"], ("train.lr", "key=value")),
    Case("set-bad-value", R + S("train.lr=1e"), ("train.lr",)),
    Case("set-section-scalar", R + S("model=3"), ("model",)),
    Case("set-null-required", R + S("model.rank=null"), ("model.rank",)),
    Case("legend-depth-min-max", R + S('method={{name="legend", depth_min=5, depth_max=2}}'), ("depth_min", "depth_max")),
    Case("hierfedlora-groups", R + S('method={{name="hierfedlora", num_groups=100}}'), ("num_groups", "100")),
    Case("hierfedlora-depths-empty", R + S('method={{name="hierfedlora", depths=[]}}'), ("depths",)),
    Case("hierfedlora-depth-beyond", R + S('method={{name="hierfedlora", depths=[1, 9]}}'), ("depth", "9")),
    Case("hetlora-rank-max", R + S('method={{name="hetlora", rank_max=64}}'), ("rank_max", "64")),
    Case("fedlora-no-settings", R + S('method={{name="fedlora", depth=2}}'), ("depth", "no settings")),
    Case("privacy-no-clip-norm", R + S('privacy.dp="local"'), ("privacy.clip_norm",)),
    Case("privacy-sigma-negative", R + S("privacy.noise_multiplier=-1.0"), ("privacy.noise_multiplier",)),
    Case("privacy-delta-one", R + S("privacy.delta=1.0"), ("privacy.delta",)),
    Case("privacy-central-hetlora", R + S('method={{name="hetlora"}}', 'privacy.dp="central"', "privacy.clip_norm=1.0"),
         ("privacy.dp", "hetlora", "local")),
    Case("topk-depth", R + S('method={{name="fedlora_topk", depth=100}}'), ("method.depth", "100")),
    Case("method-unknown-key", R + S('method={{name="legend", rank_budgte=3}}'), ("rank_budgte", "rank_budget")),
    Case("fractions-sum", R + S("data.val_fraction=0.5", "data.test_fraction=0.6"), ("val_fraction",)),
    Case("test-fraction-one", R + S("data.test_fraction=1.0"), ("data.test_fraction",)),
    Case("max-examples-small", R + S("data.max_examples=3"), ("data.max_examples",)),
    Case("dataset-unknown", R + S('data.name="rotten_tomatos"'), ("rotten_tomatos", "rotten_tomatoes")),
    Case("data-missing-file", R + S('data.name="{root}/nope.csv"'), ("nope.csv",)),
    # -- config files ------------------------------------------------------------------------
    Case("config-missing", ["run", "{root}/nope.toml", "--out", "{new}"], ("nope.toml",)),
    Case("config-not-toml", ["run", "{file}", "--out", "{new}"], ("bad.toml",), make=write_file("bad.toml", "[run\nx=")),
    Case("config-directory", ["run", "{root}", "--out", "{new}"], ("{root}",)),
    Case("config-not-utf8", ["run", "{file}", "--out", "{new}"], ("bad.toml",), make=write_file("bad.toml", b"\xff\xfe[run]")),
    Case("config-unknown-section", ["run", "{file}", "--out", "{new}"], ("bad.toml", "modle"),
         make=write_file("bad.toml", '[modle]\nname = "tiny-bert"\n')),
    Case("config-wrong-type", ["run", "{file}", "--out", "{new}"], ("bad.toml", "run.rounds"),
         make=write_file("bad.toml", '[run]\nrounds = "many"\n')),
    # -- run directories ---------------------------------------------------------------------
    Case("out-is-file", ["run", "{cfg}", "--out", "{cfg}"], ("tiny.toml", "file")),
    Case("out-under-file", ["run", "{cfg}", "--out", "{cfg}/run"], ("tiny.toml", "file")),
    Case("out-holds-run", ["run", "{cfg}", "--out", "{done}"], ("done", "--resume", "--overwrite")),
    Case("overwrite-not-a-run", ["run", "{cfg}", "--out", "{dir}", "--overwrite"], ("notes", "no config.toml"), make=not_a_run),
    Case("overwrite-bad-model-keeps-run", ["run", "{cfg}", "--out", "{run}", "--overwrite"] + S('model.name="no-such-model"'),
         ("no-such-model",), make=copy_done),
    Case("overwrite-locked", ["run", "{cfg}", "--out", "{run}", "--overwrite"], ("in use",), make=locked(copy_done, "run")),
    Case("resume-missing", ["run", "--resume", "{root}/nope"], ("nope", "config.toml")),
    Case("resume-not-a-run", ["run", "--resume", "{dir}"], ("notes", "config.toml"), make=not_a_run),
    Case("resume-with-out", ["run", "--resume", "{done}", "--out", "{new}"], ("--resume", "--out")),
    Case("resume-with-overwrite", ["run", "--resume", "{done}", "--overwrite"], ("--resume", "--overwrite")),
    Case("resume-with-set", ["run", "--resume", "{done}"] + S("train.lr=0.1"), ("--resume", "--set")),
    Case("resume-with-config", ["run", "{cfg}", "--resume", "{done}"], ("--resume", "CONFIG")),
    Case("resume-locked", ["run", "--resume", "{run}"], ("in use",), make=locked(unfinished, "run")),
    Case("resume-config-damaged", ["run", "--resume", "{run}"], ("config.toml",), make=run_edited("[run]", "[run")),
    Case("resume-config-changed", ["run", "--resume", "{run}"], ("checkpoint", "different configuration"),
         make=run_edited("lr = 0.02", "lr = 0.03")),
    Case("resume-rounds-below", ["run", "--resume", "{run}"], ("round 2", "run.rounds = 1"),
         make=run_edited("rounds = 2", "rounds = 1")),
    Case("resume-data-changed", ["run", "--resume", "{run}"], ("data", "changed"), make=changed_data),
    Case("checkpoint-garbage", ["run", "--resume", "{run}"], ("checkpoint.pt", "unreadable"),
         make=damaged_checkpoint(b"not a checkpoint")),
    Case("checkpoint-truncated", ["run", "--resume", "{run}"], ("checkpoint.pt",), make=damaged_checkpoint("truncated")),
    Case("checkpoint-not-dict", ["run", "--resume", "{run}"], ("checkpoint.pt", "format"), make=damaged_checkpoint([1, 2])),
    Case("checkpoint-lacks-keys", ["run", "--resume", "{run}"], ("checkpoint.pt", "fingerprint"),
         make=damaged_checkpoint("no-fingerprint")),
    Case("checkpoint-empty-dict", ["run", "--resume", "{run}"], ("checkpoint.pt",), make=damaged_checkpoint({"version": 1})),
    # -- compare and report ------------------------------------------------------------------
    Case("compare-config-missing", ["compare", "{root}/nope.toml", "--out", "{new}"], ("nope.toml",)),
    Case("compare-config-not-toml", ["compare", "{file}", "--out", "{new}"], ("bad.toml",), make=write_file("bad.toml", "x=")),
    Case("compare-method-unknown", ["compare", "{cfg}", "--methods", "fedlora,nosuch", "--out", "{new}"], ("nosuch",)),
    Case("compare-methods-empty", ["compare", "{cfg}", "--methods", ",", "--out", "{new}"], ("--methods",)),
    Case("compare-seeds-zero", ["compare", "{cfg}", "--seeds", "0", "--out", "{new}"], ("--seeds",)),
    Case("compare-budget-word", ["compare", "{cfg}", "--budget", "soon", "--out", "{new}"], ("--budget", "soon")),
    Case("compare-budget-negative", ["compare", "{cfg}", "--budget", "-1", "--out", "{new}"], ("--budget",)),
    Case("compare-jobs-zero", ["compare", "{cfg}", "--jobs", "0", "--out", "{new}"], ("--jobs",)),
    Case("compare-max-rounds-zero", ["compare", "{cfg}", "--max-rounds", "0", "--out", "{new}"], ("--max-rounds",)),
    Case("compare-out-file", ["compare", "{cfg}", "--methods", "fedlora", "--out", "{cfg}"], ("tiny.toml",)),
    Case("compare-bad-set", ["compare", "{cfg}", "--out", "{new}"] + S("train.lrr=1.0"), ("lrr",)),
    Case("compare-variant-unknown-method", ["compare", "{file}", "--methods", "mine", "--out", "{new}"], ("mine", "nosuch"),
         make=variants('[variants.mine]\nname = "nosuch"\n')),
    Case("compare-variant-bad-key", ["compare", "{file}", "--methods", "mine", "--out", "{new}"], ("mine", "rank_budgte"),
         make=variants('[variants.mine]\nname = "legend"\nrank_budgte = 3\n')),
    Case("compare-variant-no-name", ["compare", "{file}", "--methods", "mine", "--out", "{new}"], ("variants.mine", "name"),
         make=variants('[variants.mine]\nrank_budget = 3\n')),
    Case("report-no-runs", ["report", "{root}/empty"], ("empty",), make=lambda f, p: (f / "empty").mkdir() or {}),
    Case("report-missing-dir", ["report", "{root}/nope"], ("nope",)),
    Case("report-damaged-metrics", ["report", "{run}", "--out", "{new}"], ("metrics.jsonl",), make=damaged_metrics),
    Case("report-damaged-summary", ["report", "{run}", "--out", "{new}"], ("summary.json",), make=damaged_summary),
    # -- exported adapters -------------------------------------------------------------------
    Case("generate-no-adapter", ["generate", "{root}", "--prompt", "hi"], ("no exported adapter",)),
    Case("generate-classifier", ["generate", "{done}", "--prompt", "hi"], ("classifier",)),
    Case("adapter-config-empty", ["generate", "{run}", "--prompt", "hi"], ("adapter_config.json",),
         make=damaged_adapter(lambda a: (a / "adapter_config.json").write_text("{}"))),
    Case("adapter-config-half", ["generate", "{run}", "--prompt", "hi"], ("adapter_config.json", "JSON"),
         make=damaged_adapter(lambda a: (a / "adapter_config.json").write_text(
             (a / "adapter_config.json").read_text()[:40]))),
    Case("adapter-weights-truncated", ["generate", "{run}", "--prompt", "hi"], ("adapter_model.safetensors",),
         make=damaged_adapter(lambda a: (a / "adapter_model.safetensors").write_bytes(
             (a / "adapter_model.safetensors").read_bytes()[:300]))),
    Case("adapter-weights-missing", ["generate", "{run}", "--prompt", "hi"], ("adapter_model.safetensors",),
         make=damaged_adapter(lambda a: (a / "adapter_model.safetensors").unlink())),
    Case("adapter-meta-damaged", ["generate", "{run}", "--prompt", "hi"], ("hierfedlora.json",),
         make=damaged_adapter(lambda a: (a / "hierfedlora.json").write_text('{"base_model": '))),
    Case("adapter-head-labels", ["generate", "{run}", "--prompt", "hi"], ("3 labels",),
         make=damaged_adapter(lambda a: edit(a / "hierfedlora.json", '"label_names": [', '"label_names": ["x", '))),
    Case("generate-max-new-tokens", ["generate", "{done}", "--prompt", "hi", "--max-new-tokens", "0"],
         ("--max-new-tokens",)),
    # -- Flower options ----------------------------------------------------------------------
    Case("flower-auth-without-tls", ["flower", "{cfg}", "--out", "{new}", "--auth"], ("--auth", "--tls")),
    Case("flower-supernodes-zero", ["flower", "{cfg}", "--out", "{new}", "--supernodes", "0"], ("--supernodes",)),
    Case("flower-round-timeout", ["flower", "{cfg}", "--out", "{new}", "--round-timeout", "-3"], ("--round-timeout",)),
    Case("flower-node-wait", ["flower", "{cfg}", "--out", "{new}", "--node-wait", "0"], ("--node-wait",)),
    Case("flower-bad-set", ["flower", "{cfg}", "--out", "{new}"] + S("fleet.num_devicez=2"), ("num_devicez",)),
    Case("flower-resume-with-out", ["flower", "--resume", "{done}", "--out", "{new}"], ("--resume", "--out")),
    Case("flower-out-holds-run", ["flower", "{cfg}", "--out", "{done}"], ("done", "--overwrite")),
]


def data_case(build: Callable[[Path], tuple[str, list[str], str]]) -> Case:
    """A case of tests/bad_data.py (bad data files and folders) as a command line."""
    def make(folder: Path, paths: dict) -> dict:
        name, extra, says = build(folder)
        return {"_args": [a for s in (f"data.name={json.dumps(name)}", *extra) for a in ("--set", s)], "_says": says}
    return Case(f"data-{build.__name__}", R, (), make=make)


CASES += [data_case(build) for build in bad_data.CASES]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case run once (two at a time), with the earlier run's and the inputs' digests before
    and after."""
    root = tmp_path_factory.mktemp("bad-input")
    paths = {"root": str(root), "data": str(write_synthetic(root / "syn.csv", n=200))}
    cfg = root / "tiny.toml"
    cfg.write_text(TINY.format(**paths))
    paths["cfg"] = str(cfg)
    done = root / "done"
    r = run_cli(["run", str(cfg), "--out", str(done)], root)
    assert r.returncode == 0, r.stdout + r.stderr
    paths["done"] = str(done)
    earlier = {"done": tree_digest(done), "inputs": {p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
                                                       for p in (paths["data"], paths["cfg"])}}

    servers = [ForkedCLI(root) for _ in range(2)]
    free = list(servers)
    guard = threading.Lock()

    def one(case: Case):
        folder = root / "cases" / case.id
        folder.mkdir(parents=True)
        mine = {**paths, "root": str(folder), "new": str(folder / "new-run")}
        more = case.make(folder, mine) if case.make else {}
        lock = more.pop("_lock", None)
        args = [a.format(**{**mine, **more}) for a in case.args] + more.pop("_args", [])
        mine.update(more)
        with guard:
            server = free.pop()
        t0 = time.perf_counter()
        try:
            r = server.run(args, folder)
        finally:
            with guard:
                free.append(server)
            if lock is not None:
                lock.release()
        mine["_seconds"] = time.perf_counter() - t0
        mine["_cmd"] = args
        return r, mine

    with ThreadPoolExecutor(len(servers)) as pool:
        results = dict(zip((c.id for c in CASES), pool.map(one, CASES)))
    for server in servers:
        server.close()
    slow = sorted(results.items(), key=lambda kv: -kv[1][1]["_seconds"])[:25]
    print("slowest cases:", ", ".join(f"{k} {v[1]['_seconds']:.1f}s" for k, v in slow))
    after = {"done": tree_digest(done), "inputs": {p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
                                                     for p in (paths["data"], paths["cfg"])}}
    return results, earlier, after


def test_the_suite_is_large_and_its_names_distinct():
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_named_error(case: Case, outcomes):
    results, _, _ = outcomes
    r, mine = results[case.id]
    out = r.stdout + r.stderr
    assert r.returncode == 2, f"exit {r.returncode} for {mine['_cmd']}:\n{out[-2000:]}"
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:") or "error:" in line[:40]]
    assert errors, f"no 'error:' line:\n{out[-2000:]}"
    for word in (*case.says, *([mine["_says"]] if "_says" in mine else [])):
        assert word.format(**mine) in out, f"{word!r} not in the message:\n{out[-2000:]}"
    assert not Path(mine["new"]).exists(), "a run directory was created for a run that could not start"


def test_earlier_runs_and_inputs_are_unchanged(outcomes):
    _, earlier, after = outcomes
    assert after == earlier


def test_a_damaged_copy_is_left_as_damaged_not_repaired(outcomes):
    """The cases that resume a broken run leave its files as they were (the user's to inspect)."""
    results, _, _ = outcomes
    r, mine = results["checkpoint-garbage"]
    run = Path(mine["run"])
    assert (run / "checkpoint.pt").read_bytes() == b"not a checkpoint"
    assert (run / "config.toml").read_bytes() == (Path(mine["done"]) / "config.toml").read_bytes()
    assert not (run / "summary.json").exists()


SAMPLE = ("device-gpu", "model-unknown", "data-latin1_csv", "data-list_label_jsonl", "fleet-file-unknown-key", "checkpoint-lacks-keys", "adapter-config-half",
          "compare-method-unknown", "report-damaged-summary", "resume-with-out")


@pytest.mark.parametrize("case_id", SAMPLE)
def test_forked_command_lines_match_fresh_interpreters(case_id: str, outcomes):
    """The fork server is only a shortcut: a fresh `python -m hierfedlora.cli` gives the same exit
    status and the same error line."""
    results, _, _ = outcomes
    r, mine = results[case_id]
    fresh = run_cli(mine["_cmd"], Path(mine["root"]))
    error = lambda text: [line for line in text.splitlines() if line.startswith("error:")]  # noqa: E731
    assert fresh.returncode == r.returncode
    assert error(fresh.stdout + fresh.stderr) == error(r.stdout)


@pytest.mark.parametrize("case_id", ["overwrite-bad-model-keeps-run", "overwrite-locked"])
def test_a_refused_overwrite_leaves_the_old_run_whole(case_id: str, outcomes):
    """--overwrite replaces a run only once the new one has set up (and holds the lock)."""
    results, _, _ = outcomes
    _, mine = results[case_id]
    assert tree_digest(Path(mine["run"])) == tree_digest(Path(mine["done"]))
