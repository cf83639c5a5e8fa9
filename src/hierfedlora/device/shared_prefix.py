"""Shared prompt prefixes (design.md §4.2): instruction examples begin with the same tokens.

Every example of an instruction task starts with the same chat-template header and the same
instruction ("<|im_start|>system … <|im_start|>user Is this film critic's snippet fresh or
rotten? …": 41 of the ~74 tokens of a SmolLM2 rotten_tomatoes example). With causal attention a
position's hidden states depend only on the tokens up to it, so the rows of a batch share those
positions' hidden states and key/value cache exactly. `forward` runs the shared positions once
(a batch of one), repeats their KV cache over the rows and runs only each row's own positions on
top of it, as serving engines' prefix caches do. The result is the plain forward's up to float
rounding (the matrix shapes differ); gradients flow through the shared part once per row, as in the
plain forward. Sharing ties the rows' dropout masks on the shared part, so callers use it only
where no dropout is active (`LocalModel.may_share`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

MIN_SHARED = 8  # below this many shared tokens the second, small pass costs more than it saves


def common_length(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading positions every row of a right-padded batch shares (same token, not
    padding), leaving each row at least one position of its own; 0 below `MIN_SHARED`."""
    if len(ids) < 2:
        return 0
    same = ((ids == ids[:1]) & (mask == 1)).all(0).int()
    n = min(int(same.cumprod(0).sum()), int(mask.sum(1).min()) - 1)
    return n if n >= MIN_SHARED else 0


def common_prompt_length(prompts: list) -> int:
    """How many leading tokens all prompts (token id arrays) share, leaving each prompt at least
    its last token; 0 below `MIN_SHARED`."""
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts) - 1
    if n < MIN_SHARED:
        return 0
    head = np.stack([np.asarray(p[:n]) for p in prompts])
    same = (head == head[:1]).all(0)  # per position: every prompt has the first one's token
    n = int(np.argmin(same)) if not same.all() else n  # the first position where one differs
    return n if n >= MIN_SHARED else 0


@contextlib.contextmanager
def numbered_from_zero(layers: nn.ModuleList):
    """Number a slice of a decoder's layers 0.. for the KV cache while it runs as a stack of its
    own (`decoder_prefix` runs the layers above its cache this way); restored after."""
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    old = [getattr(a, "layer_idx", None) for a in attns]
    try:
        for i, a in enumerate(attns):
            if a is not None and hasattr(a, "layer_idx"):
                a.layer_idx = i
        yield
    finally:
        for a, idx in zip(attns, old):
            if a is not None and idx is not None:
                a.layer_idx = idx


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch, as transformers' `generate` computes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def prompt_cache(body: nn.Module, ids: torch.Tensor, mask: torch.Tensor, shared: int = 0):
    """KV cache of every token but the last of a padded prompt batch (its continuations start by
    feeding the last), from the decoder stack `body` alone; with `shared`, the first `shared`
    positions, the same in every row (padding comes after them), run once."""
    pos = positions(mask[:, :-1])
    if not shared:
        return body(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos, use_cache=True).cache
    _, head = prefill(body, shared, input_ids=ids)
    cache = repeat(head, len(ids))
    body(input_ids=ids[:, shared:-1], attention_mask=mask[:, :-1], position_ids=pos[:, shared:], cache=cache,
         use_cache=True)
    return cache


def prefill(body: nn.Module, shared: int, *, input_ids=None, inputs_embeds=None):
    """Run the first `shared` positions of row 0 through the decoder stack `body`: (their hidden
    states [1, shared, H], their KV cache), to be `repeat`ed over the rows that share them."""
    x = input_ids if input_ids is not None else inputs_embeds
    first = {"input_ids" if input_ids is not None else "inputs_embeds": x[:1, :shared]}
    out = body(**first, attention_mask=torch.ones((1, shared), dtype=torch.long, device=x.device), use_cache=True)
    return out.last_hidden_state, out.cache


def repeat(cache, n: int):
    """A new KV cache holding `cache`'s (batch of one) over `n` rows; `cache` is left as it was
    (gradients flow back to it)."""
    from transformers import DynamicCache

    kv = [(layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0))
          for layer in cache.layers if getattr(layer, "is_initialized", False)]
    return DynamicCache(ddp_cache_data=kv)


def rest(body: nn.Module, mask: torch.Tensor, shared: int, cache, *, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """Hidden states [rows, tokens - shared, H] of the positions after the shared ones, on top of
    their KV cache (`repeat`ed over the rows); `mask` covers all positions, shared ones included."""
    x = input_ids if input_ids is not None else inputs_embeds
    n, width = mask.shape
    tail = {"input_ids" if input_ids is not None else "inputs_embeds": x[:, shared:]}
    pos = torch.arange(shared, width, device=mask.device).expand(n, -1)
    return body(**tail, attention_mask=mask, position_ids=pos, cache=repeat(cache, n), use_cache=True).last_hidden_state


def forward(body: nn.Module, mask: torch.Tensor, shared: int, *, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """`body`'s last hidden states [rows, tokens, H] for a right-padded batch whose rows share
    their first `shared` positions (module docstring)."""
    head, cache = prefill(body, shared, input_ids=input_ids, inputs_embeds=inputs_embeds)
    tail = rest(body, mask, shared, cache, input_ids=input_ids, inputs_embeds=inputs_embeds)
    return torch.cat([head.expand(len(mask), -1, -1), tail], dim=1)
