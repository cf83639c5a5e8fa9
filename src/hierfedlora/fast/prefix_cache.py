"""Frozen-prefix activation cache: each example's hidden states below the trainable layers, kept.

Layers below `Strategy.lowest_trainable_layer()` = b never change during a run: their base weights are
frozen and their LoRA, if any, is never trained, so B = 0 and it adds nothing. The output of layer
b-1 for an example is therefore a constant; we compute it the first time the example is seen (in
a training batch or an evaluation) and reuse it for every later local step and evaluation. Only
layers b..L-1 and the head run after that. b is the cache's `cached_layers` (the one name for it
everywhere: the layers a forward reads from the cache instead of computing).

Two parts: `FrozenPrefix` computes and reads the rows and says whether a plan may use them (`fit`:
`fast.model.FastModel` checks every plan it loads and falls back to the full forward when the
assumption breaks); `PrefixCache` stores them: per example its unpadded [n_i, hidden] float32 rows,
in one flat array; the first `memory_mb` live in RAM and the rest spill to a disk-backed
`np.memmap` (a temporary file under the run directory, or the system temp dir), so the cache never
needs more memory than it is given.
"""

from __future__ import annotations

import enum
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hierfedlora.fast.packed import Pack, PackedEncoder, make_pack
from hierfedlora.lora_state import State, lora_key


class PrefixCache:
    """Rows of hidden states per example key (an int: the example's position in the workload)."""

    def __init__(self, hidden: int, capacity_rows: int, memory_mb: float = 1024, spill_dir: str | Path | None = None):
        self.hidden = hidden
        self.capacity_rows = capacity_rows
        self.spill_dir = spill_dir
        self._inherited: list = []
        ram_rows = min(max(capacity_rows, 0), int(memory_mb * 2**20) // (4 * hidden))
        self._stores: list[np.ndarray] = [np.empty((ram_rows, hidden), np.float32)]  # pages commit as written
        self._disk_rows = max(capacity_rows - ram_rows, 1024)
        self._file = None
        self._used = [0]
        self._where: dict[int, tuple[int, int, int]] = {}  # key -> (store, first row, rows)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: int) -> bool:
        return key in self._where

    def missing(self, keys) -> list[int]:
        return [k for k in keys if k not in self._where]

    def put(self, key: int, rows: np.ndarray) -> None:
        n = len(rows)
        s = 0 if self._used[0] + n <= len(self._stores[0]) else self._disk(n)
        start = self._used[s]
        self._stores[s][start:start + n] = rows
        self._used[s] += n
        self._where[key] = (s, start, n)

    def get(self, keys) -> np.ndarray:
        """The rows of `keys`, concatenated in that order."""
        parts = []
        for k in keys:
            s, start, n = self._where[k]
            parts.append(self._stores[s][start:start + n])
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def _disk(self, n: int) -> int:
        """Index of the disk store, created (or grown) so that `n` more rows fit."""
        if self._file is None or self._used[1] + n > len(self._stores[1]):
            rows = max(self._disk_rows, n, 2 * (len(self._stores[1]) if self._file else 0))
            old = self._stores[1][:self._used[1]] if self._file else None
            f = tempfile.NamedTemporaryFile(dir=self.spill_dir, prefix="prefix_cache-", suffix=".f32")
            store = np.memmap(f.name, dtype=np.float32, mode="w+", shape=(rows, self.hidden))
            if old is not None:
                store[:len(old)] = old
            if self._file is None:
                self._stores.append(store)
                self._used.append(0)
            else:
                self._stores[1] = store
                self._file.close()
            self._file = f
        return 1

    @property
    def bytes_in_memory(self) -> int:
        return self._used[0] * self.hidden * 4

    @property
    def bytes_on_disk(self) -> int:
        return (self._used[1] if self._file else 0) * self.hidden * 4

    def fork(self, memory_mb: float) -> None:
        """Start empty in a forked process, with its own memory cap. The parent's temporary file
        is left alone (kept referenced so that it is not deleted from here)."""
        keep = self._inherited + ([self._file] if self._file is not None else [])
        self.__init__(self.hidden, self.capacity_rows, memory_mb, self.spill_dir)
        self._inherited = keep

    def close(self) -> None:
        """Drop everything (the temporary file goes with it)."""
        self._where.clear()
        self._stores = [np.empty((0, self.hidden), np.float32)]
        self._used = [0]
        if self._file is not None:
            self._file.close()
            self._file = None


class Fit(enum.Enum):
    """Whether the cache may serve a plan (`FrozenPrefix.fit`)."""

    SERVES = "serves"
    REFUSED = "refused"  # a LoRA below the cache is not the identity: this plan runs the full forward
    VOID = "void"  # a plan trains a layer below the cache: the assumption is broken for the whole run


class FrozenPrefix:
    """Layers 0..cached_layers-1 of `encoder`'s model, computed once per example into `store`."""

    # examples per pass through the frozen layers (`python benchmarks/first_pass.py --chunks`
    # times the sizes; docs/benchmarks.md: bigger chunks gain nothing)
    CHUNK = 64

    def __init__(self, encoder: PackedEncoder, store: PrefixCache, cached_layers: int, device: torch.device):
        self.encoder, self.store, self.cached_layers, self.device = encoder, store, cached_layers, device
        self.seconds = 0.0  # time spent computing rows (worker scheduling reads it)

    def fit(self, lora: dict[tuple[int, str], nn.Module], payload: State, ranks: dict[int, int],
            trained: set[int]) -> tuple[Fit, str]:
        """Whether a plan (its payload, ranks and trained layers; `lora`: the model's LoRA modules)
        may read the cache, and why not: the cache holds layer outputs of the frozen base, so
        nothing below it may train and every LoRA below it must be the identity (B = 0)."""
        below = sorted(l for l in trained if l < self.cached_layers)
        if below:
            return Fit.VOID, (f"prefix cache invalidated: a plan trains layer {below[0]}, one of the {self.cached_layers} "
                              "cached layers (those below the strategy's lowest_trainable_layer()); running the full "
                              "forward from now on.")
        for (layer, sub), _ in lora.items():
            key = lora_key(layer, sub, "B")
            if layer < self.cached_layers and ranks.get(layer, 0) > 0 and bool(payload[key].any()):
                return Fit.REFUSED, (f"prefix cache refused: LoRA of layer {layer} is not zero, one of the "
                                     f"{self.cached_layers} cached layers; this plan runs the full forward.")
        return Fit.SERVES, ""

    @torch.no_grad()
    def warm(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Compute the rows of every example of `batches` not cached yet, CHUNK at a time (a device
        job knows all its batches before its first step). Values do not depend on which examples
        share a pass (see `packed`), so this changes no result."""
        seen, ids, keys = set(), [], []
        for b in batches:
            lengths = b["attention_mask"].sum(1).tolist()
            for row, (k, n) in enumerate(zip(b["index"].tolist(), lengths)):
                if k not in self.store and k not in seen:
                    seen.add(k)
                    ids.append(b["input_ids"][row, :n])
                    keys.append(k)
        if keys:
            self._compute_unpadded(ids, keys)

    @torch.no_grad()
    def rows_for(self, ids: list[np.ndarray]) -> list[np.ndarray]:
        """What the cache would hold for these examples (token ids, unpadded), computed but not
        stored (the model must be in eval mode: frozen layers never drop)."""
        if not ids:
            return []
        out: dict[int, np.ndarray] = {}
        self._compute_unpadded([torch.as_tensor(np.asarray(x, dtype=np.int64)) for x in ids], list(range(len(ids))),
                               lambda k, rows: out.__setitem__(k, rows.copy()))
        return [out[i] for i in range(len(ids))]

    def take(self, keys: list[int], rows: list[np.ndarray]) -> None:
        """Store rows computed elsewhere (`rows_for` in another worker) for examples not cached yet."""
        for k, r in zip(keys, rows):
            if k not in self.store:
                self.store.put(k, r)

    @torch.no_grad()
    def read(self, batch: dict[str, torch.Tensor], pack: Pack) -> torch.Tensor:
        """Hidden states entering layer `cached_layers`, packed as `pack`; computed for examples
        not cached yet, then read from the cache."""
        keys = batch["index"].tolist()
        miss = [i for i, k in enumerate(keys) if k not in self.store and k not in keys[:i]]
        if miss:
            sub = torch.tensor(miss)
            self._compute(batch["input_ids"][sub], batch["attention_mask"][sub], [keys[i] for i in miss])
        order = [keys[i] for n, a, b, members in pack.groups for i in members.tolist()]
        return torch.from_numpy(self.store.get(order)).to(self.device)

    def _compute_unpadded(self, ids: list[torch.Tensor], keys: list[int], put=None) -> None:
        """`_compute` for unpadded token-id tensors."""
        lengths = torch.tensor([len(t) for t in ids])
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        self._compute(torch.nn.utils.rnn.pad_sequence(ids, batch_first=True), mask, keys, put)

    def _compute(self, input_ids: torch.Tensor, mask: torch.Tensor, keys: list[int], put=None) -> None:
        """Layers 0..cached_layers-1 (the model in eval mode, or train mode with them frozen: they
        never drop) for these examples, CHUNK at a time, handed to `put(key, rows)` (default: into
        the store). Pad positions of `input_ids` are never read."""
        start = time.perf_counter()
        put = put or self.store.put
        for i in range(0, len(keys), self.CHUNK):
            m = mask[i:i + self.CHUNK]
            width = int(m.sum(1).max())
            sp = make_pack(m[:, :width])
            h = self.encoder.embed(input_ids[i:i + self.CHUNK, :width].to(self.device), sp)
            h = self.encoder.layers_forward(h, sp, 0, self.cached_layers).cpu().numpy()
            for (n, a, b, members) in sp.groups:
                for j, e in enumerate(members.tolist()):
                    put(keys[i + e], h[a + j * n:a + (j + 1) * n])
        self.seconds += time.perf_counter() - start
