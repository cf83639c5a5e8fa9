"""Shared by the tests of the fast path: a tiny BERT on the fast model, states and batches."""

import numpy as np
import torch
import torch.nn.functional as F

from hierfedlora.data import collate
from hierfedlora.device.model import load_base, load_tokenizer
from hierfedlora.fast.model import FastModel


def tiny_model(dropout_width=None, lora_dropout=0.0) -> FastModel:
    tok = load_tokenizer("tiny-bert")
    return FastModel(load_base("tiny-bert", 2, tok, seed=3), ["query", "value"], 4, 8.0, lora_dropout,
                     dropout_width=dropout_width)


def random_state(m: FastModel, layers) -> dict:
    """A state whose B factors are not zero (as after training), so LoRA matters."""
    g = torch.Generator().manual_seed(0)
    s = m.init_state({l: 4 for l in layers})
    return {k: (torch.randn(v.shape, generator=g) * 0.2 if k.endswith(".B") else v) for k, v in s.items()}


def batch(lengths, seed=0, width=None):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1000, 3000, size=n).astype(np.int32) for n in lengths]
    b = collate(ids, rng.integers(0, 2, size=len(ids)), 0)
    if width:  # padded to a fixed width, as a plain loop with padding="max_length" does
        extra = width - b["input_ids"].shape[1]
        b = {**b, "input_ids": F.pad(b["input_ids"], (0, extra)), "attention_mask": F.pad(b["attention_mask"], (0, extra))}
    return b


def plain_logits(m: FastModel, b):
    return m.peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


LENGTHS = [5, 9, 9, 3, 12, 20, 9, 17]


TOPK = {"method.name": "fedlora_topk", "method.depth": 2}
