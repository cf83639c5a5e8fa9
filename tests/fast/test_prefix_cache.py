"""The frozen-prefix cache changes no result, is refused or voided when its assumption breaks, and
spills to disk beyond its memory."""

import warnings

import numpy as np
import pytest
import torch

from fast_helpers import LENGTHS, batch, plain_logits, random_state, tiny_model
from hierfedlora.engine import Simulation
from hierfedlora.fast.prefix_cache import PrefixCache
from hierfedlora.lora_state import lora_key


def test_cached_and_uncached_engines_are_identical(tiny_cfg):
    topk = {"method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 3, "train.local_steps": 3}
    runs = {}
    for name, extra in {"cached": {}, "uncached": {"train.prefix_cache": False},
                        "on disk": {"train.cache_memory_mb": 0}}.items():
        sim = Simulation(tiny_cfg(**topk, **extra))
        runs[name] = (sim.run(), sim.state, sim)
    assert runs["cached"][2].cached_layers == 2 and runs["uncached"][2].cached_layers == 0
    cache = runs["on disk"][2].model.prefix.store
    assert cache.bytes_in_memory == 0 and cache.bytes_on_disk > 0
    for name in ("uncached", "on disk"):
        assert runs[name][0] == runs["cached"][0]  # every metric of every round, exactly
        assert all(torch.equal(runs[name][1][k], runs["cached"][1][k]) for k in runs["cached"][1])


def test_cache_is_refused_or_invalidated_when_its_assumption_breaks():
    m = tiny_model()
    cache = PrefixCache(32, 1000)
    assert m.enable_prefix_cache(2, cache)
    b = {**batch(LENGTHS), "index": torch.arange(len(LENGTHS))}
    ranks = {l: 4 for l in range(4)}
    ok = random_state(m, range(4))
    for l in (0, 1):  # identity LoRA below the boundary: the cache applies
        for sub in ("attention.self.query", "attention.self.value"):
            ok[lora_key(l, sub, "B")] = torch.zeros_like(ok[lora_key(l, sub, "B")])
    m.load(ok, ranks, ())
    m.eval_mode()
    with torch.no_grad():
        m.logits(b)
    assert len(cache) == len(LENGTHS)

    bad = random_state(m, range(4))  # layer 1's LoRA is not the identity: refuse, run the full forward
    with pytest.warns(UserWarning, match="refused"):
        m.load(bad, ranks, ())
    with torch.no_grad():
        torch.testing.assert_close(m.logits(b), plain_logits(m, b), rtol=1e-5, atol=1e-6)
    assert m.prefix.store is cache

    with pytest.warns(UserWarning, match="invalidated"):  # a plan trains below the boundary
        m.load(ok, ranks, (1, 2, 3))
    assert m.prefix is None and len(cache) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.load(bad, ranks, ())  # from now on the full forward, silently


def test_prefix_cache_spills_to_disk_beyond_its_memory():
    rng = np.random.default_rng(0)
    rows = {k: rng.standard_normal((n, 8)).astype(np.float32) for k, n in enumerate([5, 7, 3, 9, 4])}
    cache = PrefixCache(8, capacity_rows=12, memory_mb=12 * 8 * 4 / 2**20)
    for k, r in rows.items():
        cache.put(k, r)
    assert cache.bytes_in_memory == 12 * 8 * 4 and cache.bytes_on_disk == 16 * 8 * 4
    np.testing.assert_array_equal(cache.get([3, 0, 4]), np.concatenate([rows[3], rows[0], rows[4]]))
    assert cache.missing([0, 9, 4, 11]) == [9, 11]
    cache.close()
    assert len(cache) == 0 and cache.bytes_on_disk == 0


def test_topk_trains_and_sends_only_the_top_layers(tiny_cfg):
    sim = Simulation(tiny_cfg(**{"method.name": "fedlora_topk", "method.depth": 1, "run.rounds": 1}))
    assert sim.global_ranks == {3: 4} and sim.strategy.lowest_trainable_layer() == 3 and sim.cached_layers == 3
    row = sim.step()
    lay = sim.model.layout
    assert row["participants"] > 0
    assert row["bytes_up"] == row["participants"] * (lay.params_per_rank(3) * 4 + lay.head_params()) * 4
