"""Frozen-prefix activation cache: each example's hidden states below the trainable layers, kept.

Layers below `Strategy.lowest_trainable_layer()` = b never change during a run: their base weights are
frozen and their LoRA, if any, is never trained, so B = 0 and it adds nothing. The output of layer
b-1 for an example is therefore a constant; we compute it the first time the example is seen (in
a training batch or an evaluation) and reuse it for every later local step and evaluation. Only
layers b..L-1 and the head run after that. `LocalModel` checks the assumption on every plan it
loads and falls back to the full forward when it breaks (see `models.LocalModel.load`).

Storage: per example its unpadded [n_i, hidden] float32 rows, in one flat array; the first
`memory_mb` live in RAM and the rest spill to a disk-backed `np.memmap` (a temporary file under the
run directory, or the system temp dir), so the cache never needs more memory than it is given.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


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
