"""Export the server state as a PEFT LoRA adapter (+ classifier head) that PEFT loads (design.md §1.3):
a SEQ_CLS adapter for classification, a CAUSAL_LM one (no head: the LM head stays the base model's)
for instruction tuning.

Per-layer ranks go through PEFT's `rank_pattern`; layers without LoRA (rank 0) are simply not
targeted, by listing the full module names in `target_modules`. The head is saved through
`modules_to_save`. `hierfedlora.json` beside the adapter records the label names and base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hierfedlora.device.model import (find_layers, head_modules, head_parameters, is_causal_lm, load_base,
                                      load_tokenizer, modules_to_save, quiet_peft, resolve_model_path, task_type)
from hierfedlora.errors import AdapterError
from hierfedlora.lora_state import State, lora_key


def export_adapter(state: State, global_ranks: dict[int, int], model_name: str, target_modules: list[str],
                   alpha: float, label_names: list[str], out_dir: str | Path, seed: int = 0,
                   task: str = "classification") -> Path:
    """`target_modules`: the module names inside a layer that carry LoRA (`LocalModel.target_modules`)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections

    out = Path(out_dir)
    tok = load_tokenizer(model_name)
    base = load_base(model_name, len(label_names), tok, seed, task=task)
    if task != "instruction":
        base.config.id2label = dict(enumerate(label_names))
        base.config.label2id = {n: i for i, n in enumerate(label_names)}
    layer_path, layers = find_layers(base)
    full_names, rank_pattern = [], {}
    for l, R in sorted(global_ranks.items()):
        if R <= 0:
            continue
        for name, mod in layers[l].named_modules():
            if name.split(".")[-1] in target_modules and isinstance(mod, (torch.nn.Linear, Conv1D)):
                full = f"{layer_path}.{l}.{name}"
                full_names.append(full)
                rank_pattern[full] = R
    if not full_names:
        raise ValueError("the server state has no LoRA layer to export")
    heads = head_modules(base)
    cfg = LoraConfig(task_type=task_type(is_causal_lm(base)), r=max(rank_pattern.values()), lora_alpha=alpha,
                     target_modules=full_names, rank_pattern=rank_pattern, modules_to_save=modules_to_save(heads))
    with quiet_peft():
        pm = get_peft_model(base, cfg)
    inner = pm.base_model.model
    with torch.no_grad():
        for full in full_names:
            mod = inner.get_submodule(full)
            l = int(full[len(layer_path) + 1:].split(".", 1)[0])
            sub = full[len(layer_path) + 1:].split(".", 1)[1]
            mod.lora_A["default"].weight.copy_(state[lora_key(l, sub, "A")])
            mod.lora_B["default"].weight.copy_(state[lora_key(l, sub, "B")])
        for key, p in head_parameters(pm, heads).items():
            p.copy_(state[key])
    pm.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "hierfedlora.json").write_text(json.dumps(
        {"base_model": model_name, "base_model_path": resolve_model_path(model_name), "label_names": label_names,
         "seed": seed, "task": task}, indent=2))  # the seed rebuilds the base of the randomly initialised test models
    return out


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    """A JSON object file of an adapter directory that must hold `keys`."""
    if not path.is_file():
        raise AdapterError(f"'{path.parent}' is not a complete adapter: {path.name} is missing; export it again "
                           "(a finished run writes adapter/).")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is damaged (not valid JSON: {e}); export the adapter again.") from None
    missing = [k for k in keys if not isinstance(d, dict) or k not in d]
    if missing:
        raise AdapterError(f"{path} lacks {', '.join(missing)}; it is damaged or not an adapter file: export it again.")
    return d


def load_adapter(adapter_dir: str | Path):
    """(PeftModel in eval mode, tokenizer, label names) from an exported adapter directory; a
    missing or damaged file is an `AdapterError` naming it."""
    from peft import PeftModel
    from safetensors import SafetensorError, safe_open

    d = Path(adapter_dir)
    meta = _read_json(d / "hierfedlora.json", ("base_model", "label_names"))
    _read_json(d / "adapter_config.json", ("peft_type", "target_modules", "r"))
    weights = d / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), "pt") as f:
            for k in f.keys():
                f.get_slice(k)
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise AdapterError(f"{weights} is missing or damaged ({e}); export the adapter again.") from None
    tok = load_tokenizer(meta["base_model"])
    base = load_base(meta["base_model"], len(meta["label_names"]), tok, meta.get("seed", 0),
                     task=meta.get("task", "classification"))
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(base, d)
    except Exception as e:  # noqa: BLE001 - whatever PEFT trips on, the directory is the problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"the adapter in '{d}' does not fit its base model {meta['base_model']!r} with "
                           f"{len(meta['label_names'])} labels ({type(e).__name__}: {first[:300]}); export it again "
                           "from its run.") from None
    model.eval()
    return model, tok, meta["label_names"]
