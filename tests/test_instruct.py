"""Instruction data (`hierfedlora.instruct`): columns, classes vs open answers, tokens and the
response mask, prompt clusters, and named errors for bad files."""

import numpy as np
import pandas as pd
import pytest
import torch

from hierfedlora import instruct
from hierfedlora.device.model import load_tokenizer
from hierfedlora.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def test_user_file_with_input_column_and_class_answers(instruct_csv):
    ds = instruct.load_instructions(str(instruct_csv))
    assert len(ds) == 300 and ds.answers == ["negative", "positive"]
    assert ds.prompts[0].startswith("Is this text positive or negative?\n\n")  # input appended after a blank line
    assert [ds.answers[c] for c in ds.labels[:4]] == ds.responses[:4]


def test_prompt_response_columns_and_open_answers(tmp_path, instruct_csv):
    f = tmp_path / "pr.jsonl"
    n = 300
    pd.DataFrame({"prompt": [f"say {i}" for i in range(n)], "response": [f"reply number {i}" for i in range(n)]}
                 ).to_json(f, orient="records", lines=True)
    ds = instruct.load_instructions(str(f))
    assert ds.answers is None and ds.responses[3] == "reply number 3"  # 300 distinct responses: open
    with pytest.raises(ValueError, match="300 distinct responses, too many to score as classes"):
        instruct.load_instructions(str(f), answers="classes")
    assert instruct.load_instructions(str(instruct_csv), answers="open").answers is None


def test_bad_files_get_named_errors(tmp_path):
    f = tmp_path / "bad.csv"
    pd.DataFrame({"question": ["a", "b"], "output": ["x", "y"]}).to_csv(f, index=False)
    with pytest.raises(ValueError, match=r"no prompt column 'instruction' \(nor 'prompt'\).*data.prompt_column = 'question'"):
        instruct.load_instructions(str(f))
    pd.DataFrame({"instruction": ["a", "b", "c"], "output": ["x", "", None]}).to_csv(f, index=False)
    with pytest.raises(ValueError, match="2 empty or non-text responses in column 'output' \\(first at row 1\\)"):
        instruct.load_instructions(str(f))
    pd.DataFrame({"instruction": ["a", "b", "c"], "output": ["same"] * 3}).to_csv(f, index=False)
    with pytest.raises(ValueError, match="single response"):
        instruct.load_instructions(str(f))
    with pytest.raises(ValueError, match="not a built-in .*did you mean 'moviedialog'"):
        instruct.load_instructions("moviedialgo")


def test_encode_masks_the_prompt_and_keeps_the_response(tok):
    ids, plen = instruct.encode(tok, ["what is it?", "word " * 200], ["a cat", "long answer " * 100], max_length=40)
    eot = instruct.end_of_turn(tok)
    assert ids[0][-1] == eot and len(ids[1]) == 40
    resp = tok(["a cat"], add_special_tokens=False)["input_ids"][0]
    assert ids[0][plen[0]:].tolist() == resp + [eot]
    head = tok([instruct.prompt_text(tok, "x")], add_special_tokens=False)["input_ids"][0]
    assert ids[1][:3].tolist() == head[:3] and ids[1][plen[1] - 3:plen[1]].tolist() == head[-3:]  # middle cut
    batch = instruct.collate(ids, plen, tok.pad_token_id)
    lab = batch["labels"]
    assert (lab[0, :plen[0]] == instruct.IGNORE).all() and (lab[0, len(ids[0]):] == instruct.IGNORE).all()
    assert lab[0, plen[0]:len(ids[0])].tolist() == ids[0][plen[0]:].tolist()


def test_clusters_are_seeded_and_follow_the_embedding():
    rng = np.random.default_rng(0)
    emb = torch.zeros(20, 4)
    emb[:10, 0] = 1 + 0.01 * torch.as_tensor(rng.standard_normal(10), dtype=torch.float32)
    emb[10:, 1] = 1
    ids = [np.array([i % 10] * 3, dtype=np.int32) for i in range(30)] + [np.array([10 + i % 10] * 3, dtype=np.int32) for i in range(30)]
    plen = np.full(60, 3)
    a = instruct.cluster_ids(ids, plen, emb, k=2, seed=1)
    assert (a == instruct.cluster_ids(ids, plen, emb, k=2, seed=1)).all()
    assert set(a[:30]) == {0} and set(a[30:]) == {1}  # the two embedding directions are the two clusters


def test_saved_dataset_reads_like_the_csv_it_was_made_from(tmp_path, instruct_csv):
    import datasets

    datasets.Dataset.from_csv(str(instruct_csv)).save_to_disk(str(tmp_path / "saved"))
    saved, from_csv = instruct.load_instructions(str(tmp_path / "saved")), instruct.load_instructions(str(instruct_csv))
    assert saved.prompts == from_csv.prompts and saved.responses == from_csv.responses
    assert saved.answers == from_csv.answers and np.array_equal(saved.labels, from_csv.labels) and saved.name == "saved"


def test_missing_column_suggests_one_no_other_role_uses(tmp_path):
    f = tmp_path / "cols.csv"
    pd.DataFrame({"output_prompt": ["a", "b"], "reply": ["x", "y"]}).to_csv(f, index=False)
    # 'output_prompt' is closest to 'output' but is the prompt column: the hint names 'reply'
    with pytest.raises(DataError, match=r"cols.csv: no response column 'output' \(nor 'response'\).*closest match: 'reply'"):
        instruct.load_instructions(str(f), prompt_column="output_prompt")
    pd.DataFrame({"outputs": ["a", "b"], "query": ["x", "y"]}).to_csv(f, index=False)
    with pytest.raises(DataError, match=r"no prompt column 'instruction'.*closest match: 'query'"):
        instruct.load_instructions(str(f), response_column="outputs")


def test_unreadable_file_names_the_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "output": "x"}\n{"instruction": "b", "output": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 is not valid JSON"):
        instruct.load_instructions(str(f))
