"""Evaluating an instruction-tuned causal LM (design.md §4.2): what it generates, not only its loss.

Every evaluation reports the mean next-token cross-entropy on the response tokens (`loss`) and its
perplexity (`ppl`), and:

- responses that are classes: `acc`, the share of examples whose reference answer has the highest
  log-likelihood among the allowed answers (summed over the answer's tokens and its end of turn,
  as evaluation harnesses score multiple choice), `macro_f1` of those same choices (the answers as
  classes, `hierfedlora.metrics`), and `exact_match` of the greedy generation (decoded, stripped,
  case-folded) against the reference;
- open responses: `rougeL`, the mean ROUGE-L F-measure of the greedy generations against the
  references (Google's `rouge-score` package, with its stemmer).

Generation is greedy, batched over left-padded prompts through transformers' `generate` (KV cache),
and stops at the end of turn or after `max_new_tokens` (for class answers: the longest answer).
For class answers one pass over the prompts serves everything: its KV cache scores each answer
(the answers are the same for every prompt, so each is one small batched pass) and then seeds
`generate`; the response loss is the reference answer's log-likelihood from the same pass. On
SmolLM2 this is about a third of the cost of scoring each (prompt, answer) pair in full. The
prompt pass itself (`LocalModel.prompt_kv`) runs the prompts' shared instruction prefix once
(padding goes after it), and where the decoder prefix cache serves the evaluated model, reuses the
frozen layers' part of it from the previous evaluation (`fast.decoder_prefix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hierfedlora import instruct
from hierfedlora.device import shared_prefix
from hierfedlora.metrics import confusion_counts, macro_f1


@dataclass
class EvalSet:
    """The examples one evaluation scores: loss batches, prompts and references, and the allowed
    answers' tokens when responses are classes (`labels[i]`: example i's answer)."""

    batches: list[dict[str, torch.Tensor]]
    prompts: list[np.ndarray]
    references: list[str]
    labels: np.ndarray
    answers: list[list[int]] | None
    tokenizer: Any
    max_new_tokens: int
    batch_size: int

    @property
    def score(self) -> str:
        """The metric this set's evaluations are judged by."""
        return "acc" if self.answers is not None else "rougeL"


@torch.no_grad()
def response_loss(model, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(summed next-token cross-entropy over the response tokens, their count)."""
    total, n = 0.0, 0
    for b in batches:
        logp, _ = model.token_logprobs(b)
        total -= float(logp.double().sum())
        n += len(logp)
    return total, n


def _left_pad(prompts: list[np.ndarray], pad_id: int, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: every prompt ends where its continuation starts. With
    `shared`, the prompts' common first tokens stay in front and the padding goes after them."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :shared] = torch.as_tensor(p[:shared], dtype=torch.long)
        ids[i, width - len(p) + shared:] = torch.as_tensor(p[shared:], dtype=torch.long)
        mask[i, :shared] = 1
        mask[i, width - len(p) + shared:] = 1
    return ids, mask


@torch.no_grad()
def answer_loglik(model, ids: torch.Tensor, mask: torch.Tensor, past, answers: list[list[int]]) -> np.ndarray:
    """[examples, answers] log-likelihood of each allowed answer after each prompt of a left-padded
    batch, from the prompts' KV cache `past` (`LocalModel.prompt_kv`; left as it was)."""
    n, width = ids.shape
    out = np.zeros((n, len(answers)))
    for j, ans in enumerate(answers):
        a = torch.as_tensor(ans, dtype=torch.long, device=ids.device)
        feed = torch.cat([ids[:, -1:], a[None, :-1].expand(n, -1)], dim=1)  # last prompt token + answer
        full = torch.cat([mask, torch.ones((n, len(ans) - 1), dtype=mask.dtype, device=mask.device)], dim=1)
        logits = model.peft(input_ids=feed, attention_mask=full, position_ids=shared_prefix.positions(full)[:, width - 1:],
                            cache=past, use_cache=True).logits
        past.crop(-len(ans))  # back to the prompt's cache for the next answer
        logp = torch.log_softmax(logits.float(), dim=-1).gather(2, a[None, :, None].expand(n, -1, 1))[..., 0]
        out[:, j] = logp.double().sum(1).cpu().numpy()
    return out


@torch.no_grad()
def greedy(model, prompts: list[np.ndarray], max_new_tokens: int, eot: int, pad_id: int, batch_size: int,
           answers: list[list[int]] | None = None) -> tuple[list[list[int]], np.ndarray | None]:
    """Greedy continuations of each prompt (up to the end of turn, which is left out), by
    transformers' `generate` over left-padded batches; with `answers`, also each answer's
    log-likelihood (`answer_loglik`) from the same prompt pass, whose KV cache `generate` then
    continues (one pass over the prompts for both)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=pad_id)
    out: list[list[int]] = []
    lls = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        shared = shared_prefix.common_prompt_length(chunk)
        ids, mask = (t.to(model.device) for t in _left_pad(chunk, pad_id, shared))
        past = model.prompt_kv(ids, mask, shared)
        if answers is not None:
            lls.append(answer_loglik(model, ids, mask, past, answers))
        seqs = model.peft.generate(input_ids=ids, attention_mask=mask, cache=past, generation_config=gen)
        for row in seqs[:, ids.shape[1]:].tolist():
            out.append(row[:row.index(eot)] if eot in row else row)
    return out, (np.concatenate(lls) if answers is not None else None)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return float(np.mean(scores)) if scores else 0.0


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().split())


def metrics(model, ev: EvalSet) -> dict[str, float]:
    """Every metric of the loaded model on `ev` (see the module docstring)."""
    return evaluate(model, ev)[0]


def evaluate(model, ev: EvalSet) -> tuple[dict[str, float], np.ndarray | None]:
    """(`metrics`, the confusion counts of the answers chosen by log-likelihood; None for open
    answers), from one pass."""
    model.eval_mode()
    tok = ev.tokenizer
    pad, eot = tok.pad_token_id, instruct.end_of_turn(tok)
    new = ev.max_new_tokens if ev.answers is None else min(ev.max_new_tokens, max(len(a) for a in ev.answers))
    tokens, ll = greedy(model, ev.prompts, new, eot, pad, ev.batch_size, ev.answers)
    if ev.answers is not None:
        # the response is one of the answers: its loss is its answer's log-likelihood, already computed
        ref = ll[np.arange(len(ev.labels)), ev.labels]
        loss = float(-ref.sum() / sum(len(ev.answers[c]) for c in ev.labels))
    else:
        total, n = response_loss(model, ev.batches)
        loss = total / max(1, n)
    out: dict[str, float] = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    confusion = None
    if ev.answers is not None:
        chosen = ll.argmax(1)
        out["acc"] = float(np.mean(chosen == ev.labels))
        confusion = confusion_counts(ev.labels, chosen, len(ev.answers))
        out["macro_f1"] = macro_f1(confusion)
    texts = tok.batch_decode(tokens, skip_special_tokens=True)
    if ev.answers is not None:
        out["exact_match"] = float(np.mean([_norm(t) == _norm(r) for t, r in zip(texts, ev.references)]))
    else:
        out["rougeL"] = rouge_l(texts, ev.references)
    return out, confusion
