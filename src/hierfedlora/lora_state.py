"""The LoRA state that crosses the wire, as plain `dict[str, Tensor]`.

Keys: `"{layer}.{module}.A"` (shape [r, in]), `"{layer}.{module}.B"` (shape [out, r]) and
`"head.{module}.{param}"` for the classifier head (`head_key`). Layers are counted from the input (0) to the output
(L-1); "the top d layers" are L-d .. L-1.

Two conventions for the scale alpha/r (design.md §2, LEGEND/HetLoRA): the server keeps layer l at its
global rank R_l with update ΔW = (alpha/R_l)·B·A; a device that uses rank r ≤ R_l in that layer runs a
genuine rank-r PEFT LoRA with scale alpha/r. Handing the first r slots over unchanged would scale
them by R_l/r, so the B factor is rescaled on the way down (×r/R_l) and back up (×R_l/r): the
device's ΔW from its slots equals the server's ΔW from the same slots.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

State = dict[str, torch.Tensor]


HEAD = "head."  # the prefix of every head key


def lora_key(layer: int, module: str, factor: str) -> str:
    return f"{layer}.{module}.{factor}"


def head_key(module: str, param: str) -> str:
    """The key of parameter `param` of head module `module` (e.g. "head.classifier.weight")."""
    return f"{HEAD}{module}.{param}"


def parse_head_key(key: str) -> tuple[str, str]:
    """(head module, parameter name inside it) of a head key: `head_key` undone."""
    module, param = key[len(HEAD):].split(".", 1)
    return module, param


def parse_key(key: str) -> tuple[int, str, str] | None:
    """(layer, module, 'A'|'B') for a LoRA key, None for a head key."""
    if key.startswith(HEAD):
        return None
    layer, rest = key.split(".", 1)
    module, factor = rest.rsplit(".", 1)
    return int(layer), module, factor


def layer_of(key: str) -> int | None:
    p = parse_key(key)
    return None if p is None else p[0]


def head_and_layers(keys: Iterable[str], layers: Iterable[int]) -> list[str]:
    """The head keys and the LoRA keys of `layers` among `keys`, in order: what a device downloads
    once it holds the frozen layers, and what a group reports for the layers it trained."""
    keep = set(layers)
    return [k for k in keys if layer_of(k) is None or layer_of(k) in keep]


def num_bytes(state: State, bytes_per_param: int = 4, keys: Iterable[str] | None = None) -> int:
    """Bytes on the wire for the given tensors (all of `state` when keys is None)."""
    ks = state.keys() if keys is None else keys
    return sum(state[k].numel() for k in ks) * bytes_per_param


def to_device(state: State, ranks: dict[int, int], global_ranks: dict[int, int]) -> State:
    """Slice the server state to what a device with per-layer `ranks` runs (device convention).

    Layers with rank 0 or absent from `ranks` are not sent; the head always is.
    """
    out: State = {}
    for key, t in state.items():
        p = parse_key(key)
        if p is None:
            out[key] = t.clone()
            continue
        layer, _, factor = p
        r = ranks.get(layer, 0)
        if r <= 0:
            continue
        R = global_ranks[layer]
        if r > R:
            raise ValueError(f"device rank {r} exceeds the server's rank {R} in layer {layer}")
        out[key] = t[:r].clone() if factor == "A" else t[:, :r] * (r / R)
    return out


def from_device(payload: State, ranks: dict[int, int], global_ranks: dict[int, int]) -> State:
    """Undo `to_device`'s B rescaling: the device's slots in the server's convention (still rank r)."""
    out: State = {}
    for key, t in payload.items():
        p = parse_key(key)
        if p is None or p[2] == "A":
            out[key] = t
        else:
            layer = p[0]
            out[key] = t * (global_ranks[layer] / ranks[layer])
    return out


def delta_w(state: State, layer: int, module: str, alpha: float, rank: int) -> torch.Tensor:
    """ΔW = (alpha/rank)·B·A of one module (for tests and FlexLoRA/HetLoRA)."""
    return (alpha / rank) * state[lora_key(layer, module, "B")] @ state[lora_key(layer, module, "A")]
