"""Aggregation rules as pure functions over `dict[str, Tensor]` (design.md §2).

Updates arrive in the server's convention (see `lora_state`), possibly truncated to a device's rank
(A: [r, in], B: [out, r]) and possibly missing layers the device did not train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hierfedlora.lora_state import State, lora_key, parse_key


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


# -- heterogeneous-rank rules (LEGEND, HetLoRA, FlexLoRA; design.md §2) -------------------------------
# `ranks[k]` is device k's explicit mask: layer l is in its update iff ranks[k][l] > 0, and it holds
# slots 0 .. ranks[k][l]-1 there. Updates are in the server's convention (`lora_state`), so the B
# factor already carries the alpha/R_l scale and factors of different ranks can be averaged slot by slot.


def check_masks(update: State, ranks: Mapping[int, int]) -> None:
    """Raise unless `update` holds exactly the layers and rank slots its mask declares (catches a
    device that sent more or less than it was planned to)."""
    layers = {p[0] for p in (parse_key(k) for k in update) if p is not None}
    want = {l for l, r in ranks.items() if r > 0}
    if layers != want:
        raise ValueError(f"update holds layers {sorted(layers)}, its mask declares {sorted(want)}")
    for key, t in update.items():
        p = parse_key(key)
        if p is not None and _slot_view(t, p[2]).shape[0] != ranks[p[0]]:
            raise ValueError(f"update '{key}' has rank {_slot_view(t, p[2]).shape[0]}, its mask declares {ranks[p[0]]}")


def slot_counts(ranks: Sequence[Mapping[int, int]], global_ranks: Mapping[int, int]) -> dict[int, list[int]]:
    """c_l[j] = #{k : j < r_{k,l}}: how many devices hold slot j of layer l."""
    return {l: [sum(1 for rk in ranks if rk.get(l, 0) > j) for j in range(R)] for l, R in global_ranks.items() if R > 0}


def masked_slot_average(base: State, updates: Sequence[State], ranks: Sequence[Mapping[int, int]],
                        weights: Sequence[float]) -> State:
    """LEGEND's rule: per layer and rank slot, the data-weighted mean over the devices holding it.

    x_l[j] = Σ_k w_k·m_{k,l,j}·u_{k,l}[j] / Σ_k w_k·m_{k,l,j},  m_{k,l,j} = [j < r_{k,l}]
    Slots nobody holds keep their value. The masks are checked against the updates, then the
    average is `slot_average`, whose slots are exactly these masks.
    """
    for u, r in zip(updates, ranks, strict=True):
        check_masks(u, r)
    return slot_average(base, updates, weights)


def _key_weight(w: float | Mapping[str, float], key: str) -> float:
    return float(w[key]) if isinstance(w, Mapping) else float(w)


def zero_pad_average(base: State, updates: Sequence[State], ranks: Sequence[Mapping[int, int]],
                     weights: Sequence[float | Mapping[str, float]]) -> State:
    """HetLoRA's rule: zero-pad every update to the server's rank, then weight-average.

    x_l = Σ_{k: r_{k,l}>0} w_{k,l}·pad(u_{k,l}) / Σ_{k: r_{k,l}>0} w_{k,l}
    Unlike `masked_slot_average`, a slot is divided by the weight of every device that sent the
    layer, so slots only high-rank devices hold shrink by their share (no count normalisation).
    `weights[k]` is one number or a per-key mapping (HetLoRA's per-module ‖ΔW‖ weights). Keys nobody
    sent, or whose total weight is 0, keep their value.
    """
    for u, r in zip(updates, ranks, strict=True):
        check_masks(u, r)
    out: State = {}
    for key, old in base.items():
        p = parse_key(key)
        factor = None if p is None else p[2]
        num = torch.zeros_like(_slot_view(old, factor))
        den = 0.0
        for u, w in zip(updates, weights):
            if key not in u:
                continue
            v = _slot_view(u[key], factor)
            wk = _key_weight(w, key)
            if factor is None:
                num += wk * v
            else:
                num[: v.shape[0]] += wk * v  # pad(u)[j] = u[j] for j < r_k, 0 after
            den += wk
        new_v = num / den if den > 0 else _slot_view(old, factor).clone()
        out[key] = new_v.T.contiguous() if factor == "B" else new_v
    return out


def lora_modules(state: State) -> list[tuple[int, str]]:
    """The (layer, module) pairs that have LoRA factors in `state`, sorted."""
    return sorted({(p[0], p[1]) for p in (parse_key(k) for k in state) if p is not None})


def delta_norms(update: State, alpha: float, global_ranks: Mapping[int, int]) -> dict[tuple[int, str], float]:
    """‖ΔW_{l,m}‖_F of each module of a server-convention update.

    ‖(α/R_l)·B·A‖_F = (α/R_l)·sqrt(tr((BᵀB)(AAᵀ)))  (r×r products: no out×in matrix is formed)
    """
    out = {}
    for l, m in lora_modules(update):
        a = update[lora_key(l, m, "A")].double()
        b = update[lora_key(l, m, "B")].double()
        sq = float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0))
        out[(l, m)] = alpha / global_ranks[l] * sq**0.5
    return out


def weighted_delta_w(updates: Sequence[State], weights: Sequence[float], alpha: float,
                     global_ranks: Mapping[int, int]) -> dict[tuple[int, str], torch.Tensor]:
    """FlexLoRA's aggregate: per module, ΔW = Σ_k p_k·(α/R_l)·B_k·A_k over the updates holding it.

    p_k = w_k / Σ_{k holds the module} w_k. B_k·A_k of a rank-r_k update in the server convention is
    exactly the device's own (α/r_k)-scaled update (see `lora_state`). Computed in float64.
    """
    num: dict[tuple[int, str], torch.Tensor] = {}
    den: dict[tuple[int, str], float] = {}
    for u, w in zip(updates, weights):
        for l, m in lora_modules(u):
            d = (alpha / global_ranks[l]) * u[lora_key(l, m, "B")].double() @ u[lora_key(l, m, "A")].double()
            num[(l, m)] = num[(l, m)] + float(w) * d if (l, m) in num else float(w) * d
            den[(l, m)] = den.get((l, m), 0.0) + float(w)
    return {k: num[k] / den[k] for k in num if den[k] > 0}


def svd_factors(delta: torch.Tensor, rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [R, in], B [out, R]) whose server-convention product is ΔW's best rank-R approximation.

    ΔW = U S Vᵀ;  B = sqrt(R/α)·U_R·√S_R,  A = sqrt(R/α)·√S_R·V_Rᵀ  ⇒  (α/R)·B·A = U_R S_R V_Rᵀ
    The singular values are split evenly (√S into each factor): A and B get the same scale, so neither
    factor's gradient (∝ the other factor) starts out dwarfed, and the first r slots of both are the
    rank-r truncation (Eckart-Young) for every r ≤ R. Slots beyond ΔW's rank are zero.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.shape[0])
    root = (s[:k].clamp_min(0.0) * (rank / alpha)).sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a[:k] = root.unsqueeze(-1) * vh[:k]
    b[:, :k] = u[:, :k] * root
    return a, b


def svd_redistribute(base: State, updates: Sequence[State], ranks: Sequence[Mapping[int, int]],
                     weights: Sequence[float], alpha: float, global_ranks: Mapping[int, int]) -> State:
    """FlexLoRA's rule: per module, ΔW = Σ_k p_k ΔW_k, then A, B = `svd_factors`(ΔW, R_l).

    The head (and any key no update holds) is averaged per slot as in `slot_average` (data-weighted
    over the senders); modules nobody sent keep their factors.
    """
    for u, r in zip(updates, ranks, strict=True):
        check_masks(u, r)
    out = slot_average(base, [{k: v for k, v in u.items() if parse_key(k) is None} for u in updates], weights)
    for (l, m), delta in weighted_delta_w(updates, weights, alpha, global_ranks).items():
        a, b = svd_factors(delta, global_ranks[l], alpha)
        out[lora_key(l, m, "A")] = a.to(base[lora_key(l, m, "A")].dtype)
        out[lora_key(l, m, "B")] = b.to(base[lora_key(l, m, "B")].dtype)
    return out
