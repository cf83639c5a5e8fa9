"""Client-level differential privacy of the updates (docs/privacy.md, "Differential privacy of the updates").

What one device contributes to an aggregate is its update's change Δ = x − x₀ to the model it
started from, over the keys it uploads (`DevicePlan.uploaded`: trained LoRA factors and the head),
all tensors together as one vector. Clipping bounds ‖Δ‖₂ ≤ C; Gaussian noise of std σ·C on what is
released then makes each release one Gaussian mechanism of noise multiplier σ:

- local (on the device, before upload): x₀ + clip(Δ) + N(0, (σC)²) per coordinate;
- central (the trusted aggregator): every arriving update clipped, their uniform mean formed, and
  N(0, (σC/m)²) added to the mean of m updates: σC on their sum (DP-FedAvg, McMahan et al. 2018;
  Flower's fixed-clipping server-side DP adds the same σC/m).

The privacy a device spent after taking part in k releases is that of the Gaussian mechanism
composed k times, from `dp_accounting`'s RDP accountant (not computed here), at the neighbouring
relation "one device's update added or removed" (the accountant's default). No amplification by
subsampling is claimed: which devices take part in a round is not a Poisson sample of the fleet
(availability, grouping and deadlines decide it), so the bound holds for whatever devices took part,
as Flower's accounted DP also assumes. Replacing one device's data by another's moves Δ by up to
2C: that relation's ε is the one of multiplier σ/2.

The functions are pure; the noise comes from an explicit generator seeded from (seed, round,
device, call) or (seed, round, release), so a resumed run and every executor draw the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from hierfedlora.lora_state import State


def update_norm(update: State, reference: State, keys: Sequence[str]) -> float:
    """‖Δ‖₂ = sqrt(Σ_{k ∈ keys} ‖u_k − r_k‖²): the change of all uploaded tensors together."""
    total = sum(float(torch.sum((update[k].double() - reference[k].double()) ** 2)) for k in keys)
    return math.sqrt(total)


def clip_update(update: State, reference: State, keys: Sequence[str], clip_norm: float) -> tuple[State, float]:
    """(u with u_k ← r_k + Δ_k·min(1, C/‖Δ‖₂) on `keys`, ‖Δ‖₂ before clipping). An update within
    the bound comes back as it is, bit for bit (r + (u − r) need not be u in floats), so clipping
    with a large C changes nothing; keys outside `keys` are never touched."""
    norm = update_norm(update, reference, keys)
    if norm <= clip_norm:
        return dict(update), norm
    scale = clip_norm / norm
    out = dict(update)
    for k in keys:
        out[k] = reference[k] + (update[k] - reference[k]) * scale
    return out, norm


def add_noise(state: State, keys: Sequence[str], std: float, generator: torch.Generator) -> State:
    """x_k ← x_k + N(0, std²) on every coordinate of `keys`, drawn on the CPU in the order of
    `keys` (the same numbers wherever the model computes); std = 0 returns `state` unchanged."""
    if std == 0:
        return dict(state)
    out = dict(state)
    for k in keys:
        t = state[k]
        z = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        out[k] = t + (std * z).to(dtype=t.dtype, device=t.device)
    return out


def noise_generator(seed: tuple[int, ...]) -> torch.Generator:
    """A CPU generator seeded from a tuple (numpy's SeedSequence): noise independent of every other
    stream of the run (batches, dropout, strategy choices)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))


def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε at δ of the Gaussian mechanism of multiplier σ self-composed `releases` times, by
    dp_accounting's RDP accountant (add-or-remove-one neighbours, no sampling amplification):
    0 for no release, ∞ for σ = 0."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if releases <= 0:
        return 0.0
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), releases))
    return float(accountant.get_epsilon(delta))


def json_epsilon(eps: float) -> float | None:
    """ε as JSON can hold it: None (null) stands for ∞, i.e. no guarantee (σ = 0)."""
    return None if math.isinf(eps) else eps
