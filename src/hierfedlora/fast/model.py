"""The device model with the speed machinery: `LocalModel` plus the packed forward and the
frozen-prefix cache, the same results (design.md §1.1: an 80-device, 100-round run must fit a
2-core CPU; `benchmarks/speed.py` measures each piece).

BERT/RoBERTa run through `packed` (no work on padding), and with a frozen-prefix cache
(`prefix_cache`) only the layers a run can train are recomputed. Other architectures, and any
model on a GPU, keep `LocalModel`'s plain transformers forward.

Dropout masks are drawn as a plain loop draws them for a batch padded to `dropout_width` tokens
(None: to the batch's longest example, as `data.collate` pads), whatever the forward skips; so
results do not depend on padding, packing or caching.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import numpy as np
import torch
from torch import nn

from hierfedlora.device.model import LocalModel
from hierfedlora.fast import decoder_prefix, packed
from hierfedlora.fast.decoder_prefix import DecoderPrefix
from hierfedlora.fast.prefix_cache import Fit, FrozenPrefix, PrefixCache
from hierfedlora.lora_state import State


class FastModel(LocalModel):
    """`LocalModel` with the packed forward where the architecture has one (on CPU) and, once
    `enable_prefix_cache` is called, the frozen-prefix cache."""

    def __init__(self, base: nn.Module, target_modules: list[str], physical_rank: int, alpha: float,
                 lora_dropout: float = 0.0, seed: int = 0, device: str = "cpu", dropout_width: int | None = None):
        super().__init__(base, target_modules, physical_rank, alpha, lora_dropout, seed, device)
        inner = self.peft.base_model.model
        # The packed forward pays on CPU (no work on padding); on a GPU its many small per-length
        # attention calls cost more than the padded tokens they save (`python
        # benchmarks/gpu_forward.py`; docs/benchmarks.md), so the plain forward (and no prefix
        # cache) runs there.
        use_packed = packed.supported(inner) and self.device.type == "cpu"
        self.packed = packed.PackedEncoder(inner) if use_packed else None
        self.dropout_width = dropout_width
        self.prefix: FrozenPrefix | None = None  # see enable_prefix_cache
        self.decoder_prefix: DecoderPrefix | None = None  # see enable_decoder_prefix
        self._prefix_on = False  # whether the loaded plan reads the cache
        self._dropped_seconds = 0.0  # prefix_seconds of a cache the run voided
        self._warned: set[str] = set()

    # -- frozen-prefix cache ----------------------------------------------------------------
    def enable_prefix_cache(self, cached_layers: int, store: PrefixCache) -> bool:
        """Reuse the output of layers 0..cached_layers-1 per example (see `prefix_cache`).
        `cached_layers` must be the lowest layer any plan of the run trains. Returns False (and
        keeps the full forward) where there is nothing to skip or the architecture has no packed
        forward."""
        if self.packed is None or not 0 < cached_layers < self.num_layers:
            return False
        self.prefix = FrozenPrefix(self.packed, store, cached_layers, self.device)
        return True

    def enable_decoder_prefix(self, cached_layers: int, memory_mb: int) -> bool:
        """The frozen-prefix cache of a causal LM (`decoder_prefix`); False where the architecture
        has none or there is nothing to skip."""
        inner = self.peft.base_model.model
        if not self.causal or not decoder_prefix.supported(inner) or not 0 < cached_layers < self.num_layers:
            return False
        self.decoder_prefix = DecoderPrefix(inner.base_model, cached_layers, memory_mb)
        return True

    @property
    def cached_layers(self) -> int:
        """Layers read from the prefix cache (0 without one)."""
        if self.decoder_prefix is not None:
            return self.decoder_prefix.cached_layers
        return self.prefix.cached_layers if self.prefix is not None else 0

    @property
    def prefix_seconds(self) -> float:
        """Time spent filling the cache so far (worker scheduling reads it)."""
        if self.decoder_prefix is not None:
            return self.decoder_prefix.seconds
        return self._dropped_seconds + (self.prefix.seconds if self.prefix is not None else 0.0)

    def _cache_serves(self, payload: State, ranks: dict[int, int], trained: set[int]) -> bool:
        """Whether the cache serves this plan; a plan that voids it drops it for the rest of the run."""
        if self.prefix is None:
            return False
        fit, why = self.prefix.fit(self.lora, payload, ranks, trained)
        if fit is Fit.VOID:
            self._warn(why)
            self._drop_cache()
        elif fit is Fit.REFUSED:
            self._warn(why)
        return fit is Fit.SERVES

    def _drop_cache(self) -> None:
        self._dropped_seconds += self.prefix.seconds
        self.prefix.store.close()
        self.prefix = None

    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, stacklevel=4)

    def uses_cache(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether this batch's layers below the cache are read from it (the loaded plan allows it
        and the batch names its examples: `batch["index"]`)."""
        return self._prefix_on and "index" in batch

    def cached_rows(self, batch: dict[str, torch.Tensor], pack: packed.Pack) -> torch.Tensor:
        """The hidden states entering the first uncached layer, packed as `pack` (see `uses_cache`)."""
        return self.prefix.read(batch, pack)

    @torch.no_grad()
    def prefix_rows(self, ids: list[np.ndarray]) -> list[np.ndarray]:
        """What the cache would hold for these examples (token ids, unpadded), computed but not
        cached: a worker process computes them for examples another worker needs (`workers`)."""
        if not ids:
            return []
        self.eval_mode()  # the frozen layers as a job or an evaluation runs them: no dropout
        return self.prefix.rows_for(ids)

    # -- LocalModel, faster -----------------------------------------------------------------
    @torch.no_grad()
    def load(self, payload: State, ranks: dict[int, int], train_layers: tuple[int, ...] | list[int] = (), train_head: bool = True,
             frozen_factors: Collection[str] = ()) -> None:
        super().load(payload, ranks, train_layers, train_head, frozen_factors)
        if self.decoder_prefix is not None:
            dp = self.decoder_prefix
            self._prefix_on = (not train_layers or min(train_layers) >= dp.cached_layers) and dp.serves(
                payload, ranks, list(self.layout.modules))
            return
        self._prefix_on = self._cache_serves(payload, ranks, set(train_layers))

    def also_serve(self, payload: State, ranks: dict[int, int], train_layers: tuple[int, ...] | list[int]) -> None:
        """Keep reading the cache only if it may serve this payload too (a device whose batches are
        joined with those of the loaded one, same plan shape)."""
        self._prefix_on = self._prefix_on and self._cache_serves(payload, ranks, set(train_layers))

    @torch.no_grad()
    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Fill the cache with every example of the job's batches not in it yet (see `FrozenPrefix.warm`)."""
        if self._prefix_on and batches and all("index" in b for b in batches):
            if self.decoder_prefix is not None:
                self.decoder_prefix.warm(batches, self.device)
                return
            self.prefix.warm(batches)

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A causal LM's last hidden states, the layers below the cache read from it where the
        loaded plan allows and the batch's examples are cached (same numbers)."""
        dp = self.decoder_prefix
        if dp is not None and self._prefix_on and dp.covers(batch):
            return dp.hidden(batch, self.device, share=self.may_share())
        return super().hidden(batch)

    def prompt_kv(self, ids: torch.Tensor, mask: torch.Tensor, shared: int = 0):
        """A prompt batch's KV cache; the cached layers' part kept between evaluations where the
        loaded model leaves them without LoRA (`DecoderPrefix.prompt_kv`; same numbers)."""
        if self.decoder_prefix is not None and self._prefix_on:
            return self.decoder_prefix.prompt_kv(ids, mask, shared, self.device)
        return super().prompt_kv(ids, mask, shared)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits of a right-padded batch: packed where possible, with layers below the cache
        read from it where the plan allows (`uses_cache`)."""
        if self.packed is None:
            return super().logits(batch)
        pack = packed.make_pack(batch["attention_mask"], self.dropout_width)
        if self.uses_cache(batch):
            first = self.packed.encode(self.cached_rows(batch, pack), pack, self.cached_layers)
        else:
            first = self.packed.encode(self.packed.embed(batch["input_ids"].to(self.device), pack), pack)
        return self.packed.head(first)
