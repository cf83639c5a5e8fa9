"""Causal-LM instruction tuning on the device runtime: the response-only loss, answer scoring and
batched greedy generation against transformers' own forward and `generate`, PEFT's default targets,
and the clock's LM-head FLOPs (tiny randomly initialised Llama)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hierfedlora import instruct
from hierfedlora.clock import ModelCost, step_flops
from hierfedlora.device import instruct_eval, shared_prefix
from hierfedlora.device.model import LocalModel, load_base, load_tokenizer, model_cost


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer("tiny-llama")
    base = load_base("tiny-llama", 0, tok, seed=3, task="instruction")
    model = LocalModel(base, None, physical_rank=4, alpha=8.0, seed=3)
    ranks = {l: 4 for l in range(model.num_layers)}
    state = model.init_state(ranks)
    g = torch.Generator().manual_seed(0)
    for k in state:  # non-zero B so that LoRA changes every output
        state[k] = torch.randn(state[k].shape, generator=g) * 0.3
    model.load(state, ranks, ())
    model.eval_mode()
    prompts = ["is it good?", "tell me about the film", "a question that runs a bit longer than the others"]
    ids, plen = instruct.encode(tok, prompts, ["yes", "it is long", "no"], max_length=40)
    return tok, model, ids, plen


def test_peft_default_targets_for_llama(setup):
    _, model, _, _ = setup
    assert model.target_modules == ["q_proj", "v_proj"] and model.head == {} and model.causal


def test_response_only_loss_equals_masked_cross_entropy(setup):
    tok, model, ids, plen = setup
    batch = instruct.collate(ids, plen, tok.pad_token_id)
    ours = model.loss(batch)
    logits = model.peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for i, (x, p) in enumerate(zip(ids, plen)):  # by hand: position t predicts token t+1, response tokens only
        for t in range(int(p) - 1, len(x) - 1):
            terms.append(-F.log_softmax(logits[i, t], -1)[int(x[t + 1])])
    assert len(terms) == sum(len(x) - p for x, p in zip(ids, plen))
    assert torch.allclose(ours, torch.stack(terms).mean(), atol=1e-5)


SHARED = "Read the film critic's snippet below and say whether it is fresh or rotten. Snippet: "


def _shared_batch(tok):
    """Prompts that share a long instruction (as every instruction task's do), so the rows share
    their first tokens (`shared_prefix`)."""
    prompts = [SHARED + t for t in ("good", "a long and winding film", "bad")]
    return instruct.encode(tok, prompts, ["yes", "it is long", "no"], max_length=60)


@pytest.mark.parametrize("shared", [False, True])
def test_answer_scores_and_greedy_match_transformers(setup, shared):
    tok, model, ids, plen = setup
    if shared:
        ids, plen = _shared_batch(tok)
    prompts = [x[:p] for x, p in zip(ids, plen)]
    assert (shared_prefix.common_prompt_length(prompts) > 0) == shared
    answers = instruct.encode_answers(tok, ["yes", "no", "maybe so"])
    eot = instruct.end_of_turn(tok)
    gen, ll = instruct_eval.greedy(model, prompts, 6, eot, tok.pad_token_id, batch_size=8, answers=answers)
    for i, p in enumerate(prompts):
        x = torch.as_tensor(p, dtype=torch.long)[None]
        for j, a in enumerate(answers):  # each (prompt, answer) pair alone, full forward
            full = torch.cat([x, torch.as_tensor(a)[None]], 1)
            logp = F.log_softmax(model.peft(input_ids=full).logits[0, :-1], -1)
            want = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(a))
            assert ll[i, j] == pytest.approx(want, abs=1e-4)
        alone = model.peft.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                    eos_token_id=eot, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert gen[i] == (alone[:alone.index(eot)] if eot in alone else alone)


def test_shared_prefix_forward_equals_the_plain_forward_and_its_gradients(setup):
    """A shared prompt prefix run once gives the plain forward's hidden states and LoRA gradients."""
    tok, model, _, _ = setup
    ids, plen = _shared_batch(tok)
    batch = instruct.collate(ids, plen, tok.pad_token_id)
    n = shared_prefix.common_length(batch["input_ids"], batch["attention_mask"])
    assert n >= shared_prefix.MIN_SHARED and n < int(batch["attention_mask"].sum(1).min())
    ranks = {l: 4 for l in range(model.num_layers)}
    grads = {}
    for share in (True, False):
        model.load({k: v.clone() for k, v in model.extract(list(ranks), ranks).items()}, ranks, tuple(ranks))
        model.train_mode(0)  # no dropout configured: sharing stays on in training
        assert model.may_share()
        if share:
            h = model.hidden(batch)
        else:
            h = model.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()
        (h[mask].square().mean()).backward()
        grads[share] = (h[mask].detach(), [p.grad.clone() for p in model.trainable_parameters()])
        model.peft.zero_grad()
    model.load(model.extract(list(ranks), ranks), ranks, ())
    model.eval_mode()
    (h1, g1), (h0, g0) = grads[True], grads[False]
    assert torch.allclose(h1, h0, atol=1e-5) and len(g1) == len(g0) > 0
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g1, g0))


def test_no_sharing_while_dropout_is_active():
    """Sharing would tie the rows' dropout masks: with LoRA dropout it is off in training."""
    tok = load_tokenizer("tiny-llama")
    model = LocalModel(load_base("tiny-llama", 0, tok, seed=3, task="instruction"), None, 4, 8.0, lora_dropout=0.1)
    model.train_mode(0)
    assert not model.may_share()
    model.eval_mode()
    assert model.may_share()


def test_metrics_loss_from_answers_equals_the_batch_loss(setup):
    tok, model, _, _ = setup
    prompts, refs = ["is it good?", "is it bad?", "what now"], ["yes", "no", "no"]
    ids, plen = instruct.encode(tok, prompts, refs, max_length=40)
    batch = instruct.collate(ids, plen, tok.pad_token_id)
    ev = instruct_eval.EvalSet(batches=[batch], prompts=[x[:p] for x, p in zip(ids, plen)], references=refs,
                               labels=np.array([1, 0, 0]), answers=instruct.encode_answers(tok, ["no", "yes"]),
                               tokenizer=tok, max_new_tokens=4, batch_size=2)
    m = instruct_eval.metrics(model, ev)
    total, n = instruct_eval.response_loss(model, [batch])
    assert m["loss"] == pytest.approx(total / n, abs=1e-5)
    assert 0 <= m["acc"] <= 1 and 0 <= m["exact_match"] <= 1


def test_rouge_l_is_the_maintained_implementation():
    assert instruct_eval.rouge_l(["the cat sat"], ["the cat sat"]) == 1.0
    assert instruct_eval.rouge_l(["a b c d"], ["a c"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_clock_counts_the_lm_head_at_loss_positions(setup):
    _, model, _, _ = setup
    cost = model_cost(model.peft.base_model.model)
    assert cost.lm_head == model.peft.base_model.model.config.vocab_size and cost.mlp_matrices == 3
    plain = ModelCost(cost.hidden, cost.intermediate, cost.mlp_matrices, cost.kv_fraction)
    extra = step_flops(cost, [10, 12], 4, 2, 1.0, head_tokens=5) - step_flops(plain, [10, 12], 4, 2, 1.0)
    assert extra == pytest.approx(2 * cost.lm_head * cost.hidden * 5 * 2)
