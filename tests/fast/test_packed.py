"""The packed forward changes no result: the plain forward's logits and dropout masks, activations
independent of batch-mates, a LoRA that adds exactly zero skipped."""

import pytest
import torch

from fast_helpers import LENGTHS, batch, plain_logits, random_state, tiny_model
from hierfedlora.fast import masks
from hierfedlora.fast.packed import make_pack


@pytest.mark.parametrize("lora_dropout,fast_masks", [(0.0, True), (0.2, True), (0.2, False)])


def test_packed_forward_equals_plain_forward_with_the_same_dropout_masks(lora_dropout, fast_masks, monkeypatch):
    if not fast_masks:  # torch's bernoulli_ at the padded shape, as without numba
        monkeypatch.setattr(masks, "available", lambda: False)
    m = tiny_model(lora_dropout=lora_dropout)
    m.load(random_state(m, range(4)), {l: 4 for l in range(4)}, (2, 3))
    b = batch(LENGTHS)
    m.eval_mode()
    with torch.no_grad():
        torch.testing.assert_close(m.logits(b), plain_logits(m, b), rtol=1e-5, atol=1e-6)
    # masks as for per-batch padding, for padding to 32 tokens, and for a batch of fewer rows than MIN_ROWS
    for width, b in ((None, b), (32, b), (None, batch([4, 6, 3]))):
        m.dropout_width = width
        m.train_mode(2)
        torch.manual_seed(5)
        got = m.logits(b)
        torch.manual_seed(5)
        want = plain_logits(m, b if width is None else batch(LENGTHS, width=width))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.manual_seed(6)
        assert not torch.allclose(m.logits(b), got)  # dropout is really on in the trained layers


def test_an_examples_activations_do_not_depend_on_its_batch():
    m = tiny_model()
    m.eval_mode()
    full = batch(LENGTHS)

    def prefix(rows):
        b = {k: v[rows] for k, v in full.items()}
        width = int(b["attention_mask"].sum(1).max())
        pk = make_pack(b["attention_mask"][:, :width])
        with torch.no_grad():
            h = m.packed.layers_forward(m.packed.embed(b["input_ids"][:, :width], pk), pk, 0, 3)
        out = {}
        for n, a, _, members in pk.groups:
            for j, i in enumerate(members.tolist()):
                out[rows[i]] = h[a + j * n:a + (j + 1) * n]
        return out

    everyone = prefix(list(range(len(LENGTHS))))
    for rows in ([0], [3, 5], [1, 2, 6], [7, 4, 0]):
        for r, h in prefix(rows).items():
            assert torch.equal(h, everyone[r]), r  # bitwise: what makes the cache exact


def test_a_lora_that_adds_zero_is_skipped_only_while_it_learns_nothing():
    from hierfedlora.fast import packed

    m = tiny_model()
    m.load(m.init_state({0: 4}), {0: 4}, train_layers=())  # B = 0, nothing trains
    mod = m.lora[(0, "attention.self.query")]
    x = torch.randn(20, mod.in_features)
    pk = make_pack(torch.ones(4, 5, dtype=torch.long))
    assert packed._zero_lora(mod)
    assert torch.equal(packed.linear(mod, x, pk), mod.base_layer(x))
    m.load(m.init_state({0: 4}), {0: 4}, train_layers=(0,))  # B = 0, but it trains: B must get a gradient
    assert not packed._zero_lora(mod)
    packed.linear(mod, x, pk).sum().backward()
    assert mod.lora_B["default"].weight.grad.abs().sum() > 0
    with torch.no_grad():  # nothing learns without gradients
        assert packed._zero_lora(mod)
