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
import time

import torch
from torch import nn

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
        self.seconds = 0.0  # spent filling

    @contextlib.contextmanager
    def _stack(self, layers: nn.ModuleList):
        full = self.body.layers
        self.body.layers = layers
        try:
            yield
        finally:
            self.body.layers = full

    def serves(self, payload: State, ranks: dict[int, int], modules: list[str]) -> bool:
        """Whether a payload leaves every layer below the cache without a LoRA update."""
        for l in range(self.cached_layers):
            if ranks.get(l, 0) > 0 and any(bool(payload[lora_key(l, m, "B")].any()) for m in modules
                                           if lora_key(l, m, "B") in payload):
                return False
        return True

    @torch.no_grad()
    def warm(self, batches: list[dict[str, torch.Tensor]], device: torch.device) -> None:
        """Compute and keep the rows of every example of these batches not cached yet (in budget)."""
        t0 = time.perf_counter()
        below = nn.ModuleList(list(self.layers)[:self.cached_layers])
        out: list[torch.Tensor] = []
        hook = below[-1].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
        try:
            for b in batches:
                idx = b["index"].tolist()
                need = [i for i, e in enumerate(idx) if e not in self.rows]
                if not need or self.used >= self.budget:
                    continue
                sub = torch.as_tensor(need)
                mask = b["attention_mask"][sub]
                out.clear()
                with self._stack(below):
                    self.body(input_ids=b["input_ids"][sub].to(device), attention_mask=mask.to(device), use_cache=False)
                lens = mask.sum(1).tolist()
                for k, i in enumerate(need):
                    row = out[0][k, :lens[k]].detach().clone()
                    self.rows[idx[i]] = row
                    self.used += row.numel() * row.element_size()
        finally:
            hook.remove()
        self.seconds += time.perf_counter() - t0

    def covers(self, batch: dict[str, torch.Tensor]) -> bool:
        return "index" in batch and all(int(e) in self.rows for e in batch["index"].tolist())

    def hidden(self, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """Last hidden states of a covered batch: cached rows through the layers above the cache."""
        mask = batch["attention_mask"]
        rows = [self.rows[int(e)] for e in batch["index"].tolist()]
        x = torch.zeros((len(rows), mask.shape[1], rows[0].shape[-1]), dtype=rows[0].dtype, device=device)
        for i, r in enumerate(rows):
            x[i, :len(r)] = r
        with self._stack(nn.ModuleList(list(self.layers)[self.cached_layers:])):
            return self.body(inputs_embeds=x, attention_mask=mask.to(device), use_cache=False).last_hidden_state


def supported(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", "") in SUPPORTED and isinstance(getattr(model.base_model, "layers", None),
                                                                              nn.ModuleList)

