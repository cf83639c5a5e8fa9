"""The synthetic text task the tests share: two classes told apart by their sentiment words, as a
CSV of (text, label) rows or in instruction form. Plain functions, importable by any test module
(fixtures over them live in conftest.py)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

POS = "good great fine nice lovely superb happy bright".split()
NEG = "bad awful poor sad ugly dull grim weak".split()
NOISE = "the a movie film plot actor scene story was is".split()


def synthetic_rows(n: int, seed: int):
    """(text, class 0/1) pairs: two classes told apart by which word list their two sentiment words come from."""
    rng = random.Random(seed)
    for i in range(n):
        lab = i % 2
        words = rng.choices(NOISE, k=5) + rng.choices(POS if lab == 0 else NEG, k=2)
        rng.shuffle(words)
        yield " ".join(words), lab


def write_synthetic(path: Path, n: int = 600, seed: int = 0) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for text, lab in synthetic_rows(n, seed):
            w.writerow([text, "pos" if lab == 0 else "neg"])
    return path


def write_instructions(path: Path, n: int = 300, seed: int = 0) -> Path:
    """The synthetic task in instruction form: a question over the words, answered positive/negative."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        for text, lab in synthetic_rows(n, seed):
            w.writerow(["Is this text positive or negative?", text, "positive" if lab == 0 else "negative"])
    return path
