"""The frozen-prefix cache for decoders (design.md §1.1): with causal attention, the hidden states
of an example's tokens below the lowest trainable layer depend on nothing but the example, so
they are computed once per example and reused by every later step that trains only layers above.

Where the encoder cache (`prefix_cache`) feeds the packed forward, this one feeds transformers' own
decoder stack: for the cached part its `layers` list is swapped for the layers above the cache and
the cached states enter as `inputs_embeds` (masks and rotary positions are built from the batch as
always). That is exact for decoders whose stack does nothing to `inputs_embeds` before the first
layer (Llama, Mistral, Qwen2: `SUPPORTED`); tests/fast/test_decoder_prefix.py checks a run with the
cache against one without, adapter for adapter.

A plan may use the cache only while every layer below it has no LoRA update (B = 0 or rank 0);
`serves` says so. Rows live in RAM up to `memory_mb`; examples beyond stay uncached, and a batch
with any uncached example runs the full forward (same results, only slower).
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import torch
from torch import nn

from hierfedlora.device import shared_prefix
from hierfedlora.lora_state import State, lora_key

SUPPORTED = {"llama", "mistral", "qwen2"}


class DecoderPrefix:
    """Cached outputs of decoder layers 0..cached_layers-1, per example (`batch["index"]`)."""

    def __init__(self, body: nn.Module, cached_layers: int, memory_mb: int):
        self.body = body
        self.layers: nn.ModuleList = body.layers
        self.cached_layers = cached_layers
        self.budget = memory_mb * 2**20
        self.used = 0
        self.rows: dict[int, torch.Tensor] = {}
        self.prompts: dict[tuple, tuple[list, torch.Tensor]] = {}  # evaluation prompt batches (`prompt_kv`)
        self.prompt_hits = 0
        self.seconds = 0.0  # spent filling

    @contextlib.contextmanager
    def _stack(self, layers: nn.ModuleList):
        full = self.body.layers
        self.body.layers = layers
        try:
            yield
        finally:
            self.body.layers = full

    @contextlib.contextmanager
    def _below(self):
        """The cached layers as the stack; yields the list their last layer's outputs go to (what
        the cache holds: the stack's final norm comes after)."""
        below = nn.ModuleList(list(self.layers)[:self.cached_layers])
        out: list[torch.Tensor] = []
        hook = below[-1].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
        try:
            with self._stack(below):
                yield out
        finally:
            hook.remove()

    def serves(self, payload: State, ranks: dict[int, int], modules: list[str]) -> bool:
        """Whether a payload leaves every layer below the cache without a LoRA update."""
        for l in range(self.cached_layers):
            if ranks.get(l, 0) > 0 and any(bool(payload[lora_key(l, m, "B")].any()) for m in modules
                                           if lora_key(l, m, "B") in payload):
                return False
        return True

    @torch.no_grad()
    def warm(self, batches: list[dict[str, torch.Tensor]], device: torch.device, chunk: int = 16) -> None:
        """Compute and keep the rows of every example of these batches not cached yet (in budget).

        A row depends on its example alone, so the new examples are regrouped: sorted by length
        into chunks of `chunk` (little padding), after a prompt prefix all of them share has run
        once (`shared_prefix`)."""
        t0 = time.perf_counter()
        new: dict[int, torch.Tensor] = {}  # example -> its token ids, unpadded, in order of first use
        for b in batches:
            for e, x, m in zip(b["index"].tolist(), b["input_ids"], b["attention_mask"]):
                if e not in self.rows and e not in new:
                    new[e] = x[:int(m.sum())]
        if not new:
            return
        keys = sorted(new, key=lambda e: len(new[e]))
        shared = shared_prefix.common_prompt_length([new[e] for e in keys])
        with self._below() as out:
            if shared:
                _, cache = shared_prefix.prefill(self.body, shared, input_ids=new[keys[0]][None].to(device))
                head = out[0][0]  # the shared positions' rows, from the hook
            for s in range(0, len(keys), chunk):
                if self.used >= self.budget:
                    break
                part = keys[s:s + chunk]
                ids = nn.utils.rnn.pad_sequence([new[e] for e in part], batch_first=True).to(device)
                mask = nn.utils.rnn.pad_sequence([torch.ones(len(new[e]), dtype=torch.long) for e in part],
                                                 batch_first=True).to(device)
                out.clear()
                if shared:
                    shared_prefix.rest(self.body, mask, shared, cache, input_ids=ids)
                else:
                    self.body(input_ids=ids, attention_mask=mask, use_cache=False)
                for k, e in enumerate(part):
                    tail = out[0][k, :len(new[e]) - shared]
                    row = (torch.cat([head, tail]) if shared else tail).detach().clone()
                    self.rows[e] = row
                    self.used += row.numel() * row.element_size()
        self.seconds += time.perf_counter() - t0

    def covers(self, batch: dict[str, torch.Tensor]) -> bool:
        return "index" in batch and all(int(e) in self.rows for e in batch["index"].tolist())

    def hidden(self, batch: dict[str, torch.Tensor], device: torch.device, share: bool = True) -> torch.Tensor:
        """Last hidden states of a covered batch: cached rows through the layers above the cache
        (with `share`, a prompt prefix the rows share runs there once: `shared_prefix`)."""
        mask = batch["attention_mask"].to(device)
        rows = [self.rows[int(e)] for e in batch["index"].tolist()]
        x = torch.zeros((len(rows), mask.shape[1], rows[0].shape[-1]), dtype=rows[0].dtype, device=device)
        for i, r in enumerate(rows):
            x[i, :len(r)] = r
        above = nn.ModuleList(list(self.layers)[self.cached_layers:])
        shared = shared_prefix.common_length(batch["input_ids"].to(device), mask) if share else 0
        with self._stack(above):
            if shared:
                with shared_prefix.numbered_from_zero(above):  # the KV cache holds only these layers
                    return shared_prefix.forward(self.body, mask, shared, inputs_embeds=x)
            return self.body(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state

    @torch.no_grad()
    def prompt_kv(self, ids: torch.Tensor, mask: torch.Tensor, shared: int, device: torch.device):
        """`LocalModel.prompt_kv` for a model this cache serves: the cached layers' keys and values
        and their output for this prompt batch are the same at every evaluation, so they are kept
        (in budget) and only the layers above run again."""
        from transformers import DynamicCache

        key = (tuple(ids.shape), shared, hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest())
        above = nn.ModuleList(list(self.layers)[self.cached_layers:])
        if key in self.prompts:
            lower, x = self.prompts[key]
            self.prompt_hits += 1
        else:
            with self._below() as out:
                cache = shared_prefix.prompt_cache(self.body, ids, mask, shared)
            lower = [(layer.keys, layer.values) for layer in cache.layers[:self.cached_layers]]
            x = torch.cat([out[0].expand(len(ids), -1, -1), out[1]], dim=1) if shared else out[0]
            size = sum(k.numel() + v.numel() for k, v in lower) * x.element_size() + x.numel() * x.element_size()
            if self.used + size <= self.budget:
                self.prompts[key] = (lower, x)
                self.used += size
        with self._stack(above), shared_prefix.numbered_from_zero(above):
            m = mask[:, :-1]
            up = self.body(inputs_embeds=x, attention_mask=m, position_ids=shared_prefix.positions(m),
                           use_cache=True).cache
        upper = [(layer.keys, layer.values) for layer in up.layers[:len(above)]]
        return DynamicCache(ddp_cache_data=lower + upper)


def supported(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", "") in SUPPORTED and isinstance(getattr(model.base_model, "layers", None),
                                                                              nn.ModuleList)

