"""masks.draw gives torch's own dropout masks, bit for bit, and leaves the generator where torch would."""

import numpy as np
import pytest
import torch

from hierfedlora.fast import masks, packed
from hierfedlora.fast.packed import make_pack


def test_the_fast_path_is_on_here():
    assert masks.available()  # numba is installed and the stream matches this torch


@pytest.mark.parametrize("numel,skip,keep", [(1, 0, 0.9), (313, 1, 0.9), (5000, 7, 0.5), (20000, 623, 0.75), (4096, 2, 1.0)])
def test_selected_runs_equal_torchs_bernoulli_and_the_stream_after(numel, skip, keep):
    rng = np.random.default_rng(numel)
    cuts = np.sort(rng.choice(numel + 1, size=min(numel + 1, 41), replace=False))
    starts, length = cuts[:-1], np.diff(cuts)
    keep_runs = rng.permutation(len(starts))[:max(1, len(starts) // 2)]  # unsorted, with gaps between
    starts, length = starts[keep_runs], length[keep_runs]
    dst = np.concatenate([[0], np.cumsum(length)[:-1]])
    torch.manual_seed(11)
    torch.rand(skip)  # start anywhere in a 624-word block
    full = torch.empty(numel).bernoulli_(keep).div_(keep)
    after = torch.rand(4)
    torch.manual_seed(11)
    torch.rand(skip)
    got = masks.draw(numel, starts, length, dst, int(length.sum()), keep)
    want = torch.cat([full[s:s + n] for s, n in zip(starts, length)])
    assert torch.equal(got, want)
    assert torch.equal(torch.rand(4), after)


def test_packed_attention_masks_equal_the_padded_ones():
    """The attention-dropout entries used per bucket are those of torch's [B, H, width, width] mask."""
    mask = torch.zeros(5, 20, dtype=torch.long)
    for b, n in enumerate([3, 17, 9, 11, 20]):
        mask[b, :n] = 1
    pk = make_pack(mask, width=24)
    H, keep = 2, 0.8
    for first_only in (False, True):
        torch.manual_seed(3)
        full = torch.empty(5, H, 24, 24).bernoulli_(keep).div_(keep)
        torch.manual_seed(3)
        src, length, dst, offsets = pk.attention_runs(H, first_only)
        flat = masks.draw(5 * H * 24 * 24, src, length, dst, offsets[-1], keep)
        for j, bk in enumerate(pk.buckets):
            q = 1 if first_only else bk.width
            block = flat[offsets[j]:offsets[j + 1]].view(len(bk.members), H, q, bk.width)
            for g, (b, n) in enumerate(zip(bk.members.tolist(), bk.lengths)):
                rows = 1 if first_only else n
                assert torch.equal(block[g, :, :rows, :n], full[b, :, :rows, :n])


def test_without_the_fast_path_dropout_uses_torchs_bernoulli(monkeypatch):
    x = torch.randn(7, 6)
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1, 3] = 0
    pk = make_pack(mask)
    drop = torch.nn.Dropout(0.3).train()
    torch.manual_seed(2)
    fast = packed.dropout(x, drop, pk)
    monkeypatch.setattr(masks, "available", lambda: False)
    torch.manual_seed(2)
    assert torch.equal(packed.dropout(x, drop, pk), fast)


def test_overlapping_runs_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        masks.draw(100, np.array([10, 5]), np.array([3, 6]), np.array([0, 3]), 9, 0.9)


@pytest.mark.parametrize("first_only", [False, True])
def test_attention_runs_name_every_real_entry_once_where_its_bucket_block_holds_it(first_only):
    # against the definition, example by example: run (example e, head h, real query row i) reads
    # e's real keys from row (e, h, i) of a [B, heads, width, width] mask and writes them to row
    # (h, i) of e's [heads, queries, bucket width] block, blocks laid end to end bucket by bucket
    rng = np.random.default_rng(3)
    heads = 3
    for _ in range(60):
        B, W = int(rng.integers(1, 20)), int(rng.integers(1, 40))
        lengths = rng.integers(1, W + 1, B)
        pk = make_pack(torch.from_numpy((np.arange(W)[None, :] < lengths[:, None]).astype(np.int64)),
                       int(rng.integers(W, 50)))
        src, length, dst, offsets = [], [], [], [0]
        for bk in pk.buckets:
            q = 1 if first_only else bk.width
            for g, (e, n) in enumerate(zip(bk.members.tolist(), bk.lengths)):
                for h in range(heads):
                    for i in range(1 if first_only else n):
                        src.append(((e * heads + h) * pk.width + i) * pk.width)
                        length.append(n)
                        dst.append(offsets[-1] + ((g * heads + h) * q + i) * bk.width)
            offsets.append(offsets[-1] + len(bk.members) * heads * q * bk.width)
        got = pk.attention_runs(heads, first_only)
        for a, b in zip(got[:3], (src, length, dst)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert list(got[3]) == offsets
