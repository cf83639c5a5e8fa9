"""Experiment configuration: one typed schema, read from TOML files in `configs/`.

Every knob of a run lives here with its default, so a run directory's `config.toml` is the whole
recipe. Unknown keys and bad values are rejected with a message naming the key and, for a typo,
the closest valid key (design.md §2: "every constant is a documented setting").

Method-specific settings live in `[method]`; each strategy module declares its own `Settings`
model and this file dispatches on `method.name` (see `hierfedlora.strategies.registry`).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hierfedlora.errors import ConfigError


class _Section(BaseModel):
    # strict: "3", "yes" or true are not numbers or booleans (TOML and --set give typed values);
    # no inf/nan: a run with lr = inf would "succeed" with a NaN loss
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = Field("minilm", description="Registry name (minilm; smollm2, SmolLM2-135M-Instruct, a 30-layer Llama decoder; tiny-bert, tiny-llama for tests), a local folder, or a hub model id.")
    target_modules: list[str] | None = Field(None, description="Linear modules inside each layer that get LoRA (unset: PEFT's default for the architecture, e.g. query/value for BERT, q_proj/v_proj for Llama).")
    rank: int = Field(8, ge=1, description="LoRA rank r (methods with per-device ranks treat it as the maximum).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (trained layers only).")
    max_length: int = Field(64, ge=8, description="Tokens kept per example.")


class TaskConfig(_Section):
    kind: Literal["classification", "instruction"] = Field(
        "classification", description="classification: a sequence classifier with a fresh head; instruction: causal-LM "
        "instruction tuning of a decoder (loss on the response tokens only, the model's chat template).")
    answers: Literal["auto", "classes", "open"] = Field(
        "auto", description="instruction: whether responses are classes (scored by answer log-likelihood and exact "
        "match; partitioned by answer) or open text (ROUGE-L; partitioned by prompt cluster). auto: classes when at "
        "most 32 distinct responses cover the data.")
    max_new_tokens: int = Field(24, ge=1, description="instruction: tokens generated per test prompt (greedy).")
    clusters: int = Field(8, ge=2, description="instruction, open answers: k-means clusters of prompt embeddings that "
                          "stand in for classes in partitions and grouping.")


class DataConfig(_Section):
    name: str = Field("rotten_tomatoes", description="rotten_tomatoes, health_tweets, trec, moviedialog (instruction only); a .csv/.tsv/.jsonl/.json/.parquet file; a folder written by datasets' save_to_disk; or hf:DATASET[:CONFIG], read by datasets.load_dataset (needs the hub, or the dataset in the local datasets cache).")
    split: str = Field("train", description="Split of a saved DatasetDict folder or an hf: dataset (several joined with +, e.g. train+test, are concatenated); runs make their own test split from it.")
    text_column: str = Field("text", description="Text column of a user data file.")
    label_column: str = Field("label", description="Label column of a user data file (text, integers or booleans; one class per row).")
    prompt_column: str = Field("instruction", description="instruction: prompt column of a user file ('prompt' is found too).")
    input_column: str = Field("input", description="instruction: optional input column appended to the prompt.")
    response_column: str = Field("output", description="instruction: response column of a user file ('response' is found too).")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Stratified, seeded test split.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Held out of train for server-side validation (bandit rewards).")
    max_examples: int | None = Field(None, ge=10, description="Seeded stratified subsample of the whole data set.")
    max_test_examples: int | None = Field(1000, ge=10, description="Cap on test examples evaluated (seeded, stratified).")
    cache_dir: str = Field(".cache/hierfedlora", description="Tokenised data cache (must be writable; checked before data is read).")


class PartitionConfig(_Section):
    kind: Literal["dirichlet", "dirichlet_device", "pathological", "iid"] = Field(
        "dirichlet_device", description="dirichlet: per-class Dir(alpha) split (flwr-datasets); dirichlet_device: equal "
        "shares with per-device label mix Dir(alpha·p); pathological: k classes per device; iid.")
    alpha: float = Field(10.0, gt=0, description="Dirichlet concentration: smaller is more skewed (papers' setting: 0.1-1).")
    classes_per_device: int = Field(2, ge=1, description="Classes per device for kind = pathological.")
    min_partition_size: int = Field(10, ge=0, description="Fewest examples per device for kind = dirichlet.")


class FleetConfig(_Section):
    name: str = Field("jetson80", description="jetson80, uniform, or a fleet .toml file.")
    num_devices: int = Field(20, ge=1, description="Devices drawn (seeded) from the fleet.")
    participation: float = Field(0.5, gt=0, le=1, description="Fraction of devices available each round.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Probability a selected device drops out of a round.")
    deadline_s: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "How long an aggregator waits for a device's update in one exchange, in simulated seconds from sending it "
        "its model; later updates are discarded (stragglers) and a dropped device is waited for this long. "
        "Unset: no deadline, a dropped device is waited for as long as its job would have taken."))
    bandwidth_jitter: float = Field(0.0, ge=0, lt=1, description="Per-round WAN bandwidth factor ~ U(1-j, 1+j).")
    aggregator: Literal["edge", "ps"] = Field("edge", description="Group aggregator: an edge node on the LAN, or the PS itself (WAN).")
    secure_aggregation: bool = Field(False, description=(
        "Aggregators see only the data-weighted sum of their devices' updates, never one update (SecAgg+ on "
        "Flower, a plain sum in process; docs/flower.md). Methods whose rule needs each update refuse it."))
    bytes_per_param: int = Field(4, description="Wire size of one parameter (4 = float32, 2 = float16).")
    backward_ratio: float = Field(1.0, gt=0, description="Backward FLOPs of a LoRA layer relative to its forward.")

    @field_validator("bytes_per_param")
    @classmethod
    def _bpp(cls, v: int) -> int:
        if v not in (1, 2, 4):
            raise ValueError("must be 1, 2 or 4")
        return v


class TrainConfig(_Section):
    local_steps: int = Field(8, ge=1, description="Local steps E per device per (intra-group) round.")
    batch_size: int = Field(16, ge=1, description="Local batch size.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate of local training (fresh optimiser each local round).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    eval_batch_size: int = Field(128, ge=1, description="Batch size of evaluation (test and validation).")
    threads: int = Field(0, ge=0, description="torch threads (0 = all cores).")
    device: str = Field("auto", description="Where the simulator computes: auto (cuda if present), cpu, cuda, cuda:N.")
    prefix_cache: bool = Field(True, description="Compute layers below the lowest trainable layer once per example and reuse them (same results).")
    cache_memory_mb: int = Field(1024, ge=0, description="RAM for the prefix cache; the rest spills to a temporary file.")
    workers: int = Field(1, ge=0, description="Processes that run device jobs (0 = one per CPU core); same results, faster on multi-core CPUs.")
    lockstep: int = Field(8, ge=1, description="Devices of the same plan shape trained together in one forward and backward per step (1 = one at a time); same results, fewer operations.")


    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", v):
            raise ValueError(f"'{v}' is not a device: use auto, cpu, cuda, cuda:N or mps")
        return v

class RunConfig(_Section):
    seed: int = Field(0, ge=0, lt=2**32, description="Seeds data split, partition, fleet draw, model init and training.")
    rounds: int = Field(12, ge=1, description="Global rounds (with budget_s: the most rounds).")
    budget_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="Simulated-time budget in seconds: rounds run until the simulated clock reaches it (evaluated at the round that crosses it); rounds stays a cap.")
    eval_every: int = Field(2, ge=1, description="Evaluate on the test split every N rounds (and after the last).")
    checkpoint_every: int = Field(2, ge=1, description="Write checkpoint.pt every N rounds.")
    target_acc: float | None = Field(None, gt=0, le=1, description="Report simulated time/traffic to this test score (run.metric; ROUGE-L for open answers).")
    metric: Literal["accuracy", "macro_f1"] = Field(
        "accuracy", description="The run's score: what run.target_acc, the summary's final/best score, compare's tables "
        "and budget rule, and HierFedLoRA's accuracy reward measure. macro_f1: mean per-class F1 over the classes in "
        "the labels or predictions (imbalanced data); every evaluation reports both.")
    progress: bool = Field(True, description="Show a progress bar.")


class PrivacyConfig(_Section):
    """Client-level differential privacy of the updates (docs/privacy.md): each device's update is
    clipped to `clip_norm` and Gaussian noise of multiplier `noise_multiplier` is added, on the
    device (local) or to the aggregate by the trusted aggregator (central)."""

    dp: Literal["off", "central", "local"] = Field(
        "off", description="off: updates as trained; central: the aggregator clips each update to clip_norm, averages "
        "them with equal weights and adds N(0, (σ·C/m)²) to the mean of m; local: each device clips its update and adds "
        "N(0, (σ·C)²) before uploading. The run reports ε at delta per round (dp_epsilon in metrics.jsonl).")
    clip_norm: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "C: bound on the L2 norm of a device's update (its change to the uploaded LoRA factors and head, all tensors "
        "together); required with dp on. dp_update_norm in metrics.jsonl reports the norms before clipping."))
    noise_multiplier: float = Field(0.0, ge=0, description=(
        "σ: noise std as a multiple of clip_norm (on the mean of m updates: σ·C/m); 0 adds none and gives ε = ∞."))
    delta: float = Field(1e-5, gt=0, lt=1, description="δ at which ε is reported (smaller than 1/num_devices is usual).")

    @model_validator(mode="after")
    def _clip_when_on(self) -> "PrivacyConfig":
        if self.dp != "off" and self.clip_norm is None:
            raise ValueError(f"dp = \"{self.dp}\" needs privacy.clip_norm (C > 0, e.g. 1.0; a short run's dp_update_norm "
                             "shows the norms to pick it from)")
        return self


class TrackingConfig(_Section):
    # mirrors of the run directory only: left out of the checkpoint's fingerprint (engine.config_fingerprint)
    tensorboard: bool = Field(False, description="Log per-round metrics, the config and the summary as TensorBoard event files in <run dir>/tensorboard.")
    mlflow: bool = Field(False, description="Log per-round metrics, the config (as params), the summary and the run's files to an MLflow tracking store.")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI: sqlite:///PATH.db, a database URL, or a tracking server (http://HOST:5000); unset: sqlite:///mlflow.db in the working directory (MLflow's own default), artifacts in ./mlruns beside it.")
    mlflow_experiment: str = Field("hierfedlora", min_length=1, description="MLflow experiment the runs are logged under (created when missing).")


class ExperimentConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "fedlora"})

    def method_settings(self) -> BaseModel:
        from hierfedlora.strategies.registry import get_strategy

        spec = dict(self.method)
        name = spec.pop("name", "fedlora")
        if not isinstance(name, str):
            raise ConfigError(f"bad value for 'method.name': a method name is text, e.g. \"hierfedlora\" (got {name!r}).")
        entry = get_strategy(name)
        try:
            return entry.settings(**spec)
        except ValidationError as e:
            raise ConfigError(_format_errors(e, entry.settings, prefix="method.")) from None

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude_none=True)
        settings = self.method_settings()
        d["method"] = {"name": self.method.get("name", "fedlora"), **settings.model_dump(mode="json", exclude_none=True)}
        return d


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at location `loc` inside `model` (for did-you-mean hints)."""
    cur: Any = model
    for part in loc[:-1]:
        field = cur.model_fields.get(part) if isinstance(cur, type) and issubclass(cur, BaseModel) else None
        if field is None:
            return []
        cur = field.annotation
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _format_errors(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = prefix + ".".join(loc)
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(model, loc)
            close = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = (f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(valid)}." if valid
                    else " This section takes no settings.")
            lines.append(f"unknown key '{key}'.{hint}")
        else:
            where = key or prefix.rstrip(".") or "config"  # a check across keys has no location
            lines.append(f"bad value for '{where}': {e['msg']} (got {e.get('input')!r}).")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as TOML, else taken as a string;
    `a.b=null` gives None (an optional key back to unset)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}' (e.g. --set train.lr=5e-4).")
    key, raw = item.split("=", 1)
    if raw.strip() == "null":  # TOML has no null: this resets an optional key to its unset value
        return key.strip().split("."), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    # [variants.*] tables name extra methods for `hierfedlora compare`; a single run ignores them
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items() if k != "variants"}
    for item in overrides or []:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a section.")
        node[path[-1]] = value
    try:
        cfg = ExperimentConfig(**raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, ExperimentConfig)) from None
    cfg.method_settings()  # validate the method section now, not mid-run
    check_secure_aggregation(cfg)
    return cfg


def check_secure_aggregation(cfg: ExperimentConfig) -> None:
    """Refuse `fleet.secure_aggregation` for a method whose aggregation needs each device's update
    (its `secure_aggregation_refusal` says why), or with a deadline (a late update is already in the sum)."""
    if not cfg.fleet.secure_aggregation:
        return
    from hierfedlora.strategies.registry import available, get_strategy

    name = cfg.method.get("name", "fedlora")
    reason = get_strategy(name).strategy.secure_aggregation_refusal
    if reason is not None:
        ok = sorted(n for n, e in available().items() if e.strategy.secure_aggregation_refusal is None)
        raise ConfigError(f"fleet.secure_aggregation: method '{name}' cannot run under secure aggregation: {reason}. "
                          f"Turn fleet.secure_aggregation off, or use a method that can: {', '.join(ok)}.")
    if cfg.privacy.dp == "central":
        raise ConfigError("fleet.secure_aggregation cannot be combined with privacy.dp = \"central\": central DP "
                          "clips each update at a trusted aggregator, which secure aggregation keeps from seeing it. "
                          "Use privacy.dp = \"local\" (each device clips and noises its update before masking), or "
                          "turn fleet.secure_aggregation off.")
    if cfg.fleet.deadline_s is not None:
        raise ConfigError("fleet.secure_aggregation cannot be combined with fleet.deadline_s: a straggler's update is "
                          "discarded after it arrives, but under secure aggregation it is already in the sum. "
                          "Unset fleet.deadline_s.")


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's tables, or a named error when it is missing or not TOML."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file '{p}' is a directory; give a .toml file (see configs/ for examples).")
    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found (see configs/ for examples).")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {e.object[e.start]:#04x} at position {e.start}); "
                          "save it as UTF-8.") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    if path is None:
        return build_config({}, overrides)
    try:
        return build_config(read_toml(path), overrides)
    except ConfigError as e:
        if str(e).startswith("config file"):
            raise
        raise ConfigError(f"config file '{path}'{' with --set overrides' if overrides else ''}: {e}") from None


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(cfg.to_dict()))
