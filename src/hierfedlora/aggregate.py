"""Aggregation rules as pure functions over `dict[str, Tensor]` (SPEC §2).

Updates arrive in the server's convention (see `lora_state`), possibly truncated to a device's rank
(A: [r, in], B: [out, r]) and possibly missing layers the device did not train.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hierfedlora.lora_state import State, parse_key


def fedavg(updates: Sequence[State], weights: Sequence[float]) -> State:
    """Σ_k w_k·x_k / Σ_k w_k over identically shaped states (FedAvg, McMahan et al. 2017)."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    total = float(sum(weights))
    return {
        key: sum(float(w) * u[key] for u, w in zip(updates, weights)) / total
        for key in updates[0]
    }


def _slot_view(t: torch.Tensor, factor: str | None) -> torch.Tensor:
    """View with rank slots on dim 0: A is [r, in] already, B [out, r] is transposed; head has no slots."""
    return t.T if factor == "B" else t


def slot_average(base: State, updates: Sequence[State], weights: Sequence[float]) -> State:
    """Per-key, per-rank-slot weighted average over the updates that hold the slot.

    x[slot] = Σ_{k holds slot} w_k·u_k[slot] / Σ_{k holds slot} w_k   (zero-pad + count normalisation)
    Slots and keys nobody sent keep their value in `base`. With full-rank updates of every key this is
    FedAvg; with updates of different depths it is layer-wise aggregation; with different ranks it is
    LEGEND's per-slot rule.
    """
    out: State = {}
    for key, old in base.items():
        p = parse_key(key)
        factor = None if p is None else p[2]
        old_v = _slot_view(old, factor)
        num = torch.zeros_like(old_v)
        den = torch.zeros(old_v.shape[0], dtype=old.dtype) if factor else torch.zeros((), dtype=old.dtype)
        for u, w in zip(updates, weights):
            if key not in u:
                continue
            v = _slot_view(u[key], factor)
            r = v.shape[0]
            if factor is None:
                num += w * v
                den += w
            else:
                if r > old_v.shape[0]:
                    raise ValueError(f"update for '{key}' has rank {r} > server rank {old_v.shape[0]}")
                num[:r] += w * v
                den[:r] += w
        held = den > 0
        new_v = old_v.clone()
        if factor is None:
            if held:
                new_v = num / den
        else:
            new_v[held] = num[held] / den[held].unsqueeze(-1)
        out[key] = new_v.T.contiguous() if factor == "B" else new_v
    return out
