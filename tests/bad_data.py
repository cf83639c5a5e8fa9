"""Bad user data, one case per builder: each writes one bad input (a file or a folder) into a given
directory and returns `(data.name, extra --set overrides, a substring the error message must hold)`.

The substring names the source (file, folder, spec or setting) and the problem, so a test that finds
it checks both. Tests run every case through `load_dataset` / `load_instructions` in-process and
through `hierfedlora run` (tests/test_bad_input.py), where each must end in one `error:`
line, exit status 2 and no run directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

Case = tuple[str, list[str], str]

INSTRUCTION = ['task.kind="instruction"', 'model.name="tiny-llama"']  # after the tiny-bert --set: later wins


def _good_rows(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"example text {i}" for i in range(n)], "label": ["pos", "neg"] * (n // 2)})


def _write(tmp: Path, name: str, content: str | bytes) -> Path:
    p = tmp / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def latin1_csv(tmp: Path) -> Case:
    body = "text,label\ngood,pos\ncaf\xe9 au lait,neg\n".encode("latin-1")
    p = _write(tmp, "latin1.csv", body)
    return str(p), [], f"{p}: not valid UTF-8 (byte 0xe9 at position {body.index(0xE9)}); save it as UTF-8"


def utf16_csv(tmp: Path) -> Case:
    p = _write(tmp, "utf16.csv", "text,label\na,pos\nb,neg\n".encode("utf-16"))
    return str(p), [], f"{p}: not valid UTF-8 (byte 0xff at position 0) (it starts like UTF-16)"


def ragged_csv(tmp: Path) -> Case:
    p = _write(tmp, "ragged.csv", "text,label\na,pos\nb,neg,extra\n")
    return str(p), [], f"{p}: not a valid CSV (Expected 2 fields in line 3, saw 3)"


def unclosed_quote_csv(tmp: Path) -> Case:
    p = _write(tmp, "quote.csv", 'text,label\n"a,pos\nb,neg\n')
    return str(p), [], f"{p}: not a valid CSV (EOF inside string starting at row 1)"


def empty_csv(tmp: Path) -> Case:
    p = _write(tmp, "empty.csv", "")
    return str(p), [], f"{p}: the file is empty"


def header_only_csv(tmp: Path) -> Case:
    p = _write(tmp, "header.csv", "text,label\n")
    return str(p), [], f"{p}: has columns ['text', 'label'] but no rows"


def semicolon_csv(tmp: Path) -> Case:
    p = _write(tmp, "semi.csv", "text;label\na;pos\nb;neg\n")
    return str(p), [], "the header is one column holding a separator"


def missing_label_column(tmp: Path) -> Case:
    p = tmp / "nolabel.csv"
    _good_rows().rename(columns={"label": "sentiment"}).to_csv(p, index=False)
    return str(p), [], f"{p}: no label column 'label'; columns present: ['text', 'sentiment']; closest match: 'sentiment'"


def missing_text_column(tmp: Path) -> Case:
    p = tmp / "notext.csv"
    _good_rows().rename(columns={"text": "review"}).to_csv(p, index=False)
    return str(p), [], f"{p}: no text column 'text'; columns present: ['review', 'label']; closest match: 'review'"


def _jsonl(tmp: Path, name: str, rows: list) -> Path:
    return _write(tmp, name, "".join(json.dumps(r) + "\n" for r in rows))


def malformed_jsonl(tmp: Path) -> Case:
    p = _write(tmp, "broken.jsonl", '{"text": "a", "label": "pos"}\n\n{"text": "b", "label": "neg"}\n{"text": "c", "label"\n')
    return str(p), [], f"{p}: line 4 is not valid JSON (Expecting ':' delimiter at column 22)"


def jsonl_not_objects(tmp: Path) -> Case:
    p = _jsonl(tmp, "arrays.jsonl", [{"text": "a", "label": "pos"}, ["b", "neg"]])
    return str(p), [], f"{p}: line 2 is a JSON list, not an object"


def list_label_jsonl(tmp: Path) -> Case:
    p = _jsonl(tmp, "multilabel.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": ["pos", "neg"]}])
    return str(p), [], f"{p}: label column 'label' holds a list at row 1"


def dict_label_jsonl(tmp: Path) -> Case:
    p = _jsonl(tmp, "dictlabel.jsonl", [{"text": "a", "label": {"name": "pos"}}, {"text": "b", "label": "neg"}])
    return str(p), [], f"{p}: label column 'label' holds a dict at row 0"


def list_text_jsonl(tmp: Path) -> Case:
    p = _jsonl(tmp, "listtext.jsonl", [{"text": ["a", "b"], "label": "pos"}, {"text": "c", "label": "neg"}])
    return str(p), [], f"{p}: text column 'text' holds a list at row 0"


def bool_and_text_labels_jsonl(tmp: Path) -> Case:
    p = _jsonl(tmp, "boolmix.jsonl", [{"text": "a", "label": True}, {"text": "b", "label": "neg"}])
    return str(p), [], f"{p}: label column 'label' mixes kinds of labels: boolean (True at row 0), text ('neg' at row 1)"


def fractional_labels_jsonl(tmp: Path) -> Case:
    p = _jsonl(tmp, "scores.jsonl", [{"text": f"t{i}", "label": i / 10} for i in range(10)])
    return str(p), [], f"{p}: label column 'label' holds fractional numbers (0.1 at row 1)"


def malformed_json(tmp: Path) -> Case:
    p = _write(tmp, "broken.json", '[{"text": "a", "label": "pos"},\n {"text": "b", "label": "neg"}\n')
    return str(p), [], f"{p}: not valid JSON (Expecting ',' delimiter at line 3, column 1)"


def json_without_records(tmp: Path) -> Case:
    p = _write(tmp, "number.json", "42\n")
    return str(p), [], f"{p}: holds no records"


def garbage_parquet(tmp: Path) -> Case:
    p = _write(tmp, "fake.parquet", "text,label\na,pos\n")
    return str(p), [], f"{p}: not a readable Parquet file"


def unsupported_suffix(tmp: Path) -> Case:
    p = _write(tmp, "sheet.xlsx", b"PK\x03\x04")
    return str(p), [], f"{p}: unsupported file type '.xlsx'"


def single_class(tmp: Path) -> Case:
    p = tmp / "oneclass.csv"
    _good_rows().assign(label="pos").to_csv(p, index=False)
    return str(p), [], f"{p}: every example has the label 'pos' (column 'label'): classification needs at least 2 classes"


def all_labels_missing(tmp: Path) -> Case:
    p = _write(tmp, "nolabels.csv", "text,label\na,\nb,\n")
    return str(p), [], f"{p}: no examples left"


def all_whitespace_texts(tmp: Path) -> Case:
    p = _write(tmp, "blank.csv", 'text,label\n"   ",pos\n"\t",neg\n')
    return str(p), [], f"{p}: no examples left"


def unknown_name(tmp: Path) -> Case:
    return "rotten_tomatos", [], "unknown dataset 'rotten_tomatos'"


def folder_not_saved_dataset(tmp: Path) -> Case:
    d = tmp / "plainfolder"
    d.mkdir()
    _good_rows().to_csv(d / "train.csv", index=False)
    return str(d), [], f"{d}: a folder, but not a dataset saved by datasets' save_to_disk"


def damaged_saved_dataset(tmp: Path) -> Case:
    d = tmp / "damaged"
    d.mkdir()
    (d / "state.json").write_text("{not json")
    return str(d), [], f"{d}: a saved dataset that cannot be read"


def saved_dict_without_split(tmp: Path) -> Case:
    import datasets

    d = tmp / "saved_dict"
    ds = datasets.Dataset.from_pandas(_good_rows())
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(d))
    return str(d), ['data.split="validation"'], f"{d}: no split 'validation' (data.split); splits present: ['train', 'test']"


def hub_spec_offline(tmp: Path) -> Case:
    return ("hf:hierfedlora-tests/no-such-dataset", [],
            "data.name 'hf:hierfedlora-tests/no-such-dataset': the Hugging Face hub is not reachable (offline)")


def hub_spec_without_dataset(tmp: Path) -> Case:
    return "hf:", [], "data.name 'hf:': name a dataset after 'hf:'"


def unwritable_cache_dir(tmp: Path) -> Case:
    p = tmp / "good.csv"
    _good_rows().to_csv(p, index=False)
    blocker = _write(tmp, "a_file", "not a directory")
    cache = blocker / "cache"  # under a regular file: no one, root included, can create it
    return str(p), [f'data.cache_dir="{cache}"'], f"data.cache_dir '{cache}': cannot write the tokenised data cache there"


def instruction_missing_prompt(tmp: Path) -> Case:
    p = tmp / "noprompt.csv"
    pd.DataFrame({"output": ["yes", "no"] * 10, "question": [f"q{i}" for i in range(20)]}).to_csv(p, index=False)
    return (str(p), INSTRUCTION,
            f"{p}: no prompt column 'instruction' (nor 'prompt'); columns present: ['output', 'question']; "
            "closest match: 'question'")


def instruction_missing_response(tmp: Path) -> Case:
    p = tmp / "noresponse.jsonl"
    _jsonl(tmp, p.name, [{"instruction": f"say {i}", "answer": "yes" if i % 2 else "no"} for i in range(20)])
    return (str(p), INSTRUCTION,
            f"{p}: no response column 'output' (nor 'response'); columns present: ['instruction', 'answer']; "
            "closest match: 'answer'")


def instruction_empty_responses(tmp: Path) -> Case:
    p = _write(tmp, "noanswers.csv", "instruction,output\nsay a,yes\nsay b,\nsay c,   \n")
    return str(p), INSTRUCTION, f"{p}: 2 empty or non-text responses in column 'output' (first at row 1)"


def instruction_not_utf8(tmp: Path) -> Case:
    body = "instruction,output\nsay caf\xe9,yes\n".encode("latin-1")
    p = _write(tmp, "inst_latin1.csv", body)
    return str(p), INSTRUCTION, f"{p}: not valid UTF-8 (byte 0xe9 at position {body.index(0xE9)})"


CASES: list[Callable[[Path], Case]] = [
    latin1_csv, utf16_csv, ragged_csv, unclosed_quote_csv, empty_csv, header_only_csv, semicolon_csv,
    missing_label_column, missing_text_column, malformed_jsonl, jsonl_not_objects, list_label_jsonl,
    dict_label_jsonl, list_text_jsonl, bool_and_text_labels_jsonl, fractional_labels_jsonl, malformed_json,
    json_without_records, garbage_parquet, unsupported_suffix, single_class, all_labels_missing,
    all_whitespace_texts, unknown_name, folder_not_saved_dataset, damaged_saved_dataset, saved_dict_without_split,
    hub_spec_offline, hub_spec_without_dataset, unwritable_cache_dir, instruction_missing_prompt,
    instruction_missing_response, instruction_empty_responses, instruction_not_utf8,
]

# the cases whose problem is a setting (ConfigError); every other case is a DataError
CONFIG_CASES: set[Callable[[Path], Case]] = {hub_spec_without_dataset, unwritable_cache_dir}
