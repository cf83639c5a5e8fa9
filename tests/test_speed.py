"""The speed work changes no result: packed forward, frozen-prefix cache, dropout masks, topk baseline."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hierfedlora import masks
from hierfedlora.data import collate
from hierfedlora.engine import Simulation
from hierfedlora.lora_state import lora_key, to_device
from hierfedlora.models import LocalModel, load_base, load_tokenizer
from hierfedlora.packed import make_pack
from hierfedlora.prefix_cache import PrefixCache
from hierfedlora.protocol import DevicePlan
from hierfedlora.protocol import DeviceJob, LocalTraining
from hierfedlora.trainer import DeviceData, run_job


def tiny_model(dropout_width=None, lora_dropout=0.0) -> LocalModel:
    tok = load_tokenizer("tiny-bert")
    return LocalModel(load_base("tiny-bert", 2, tok, seed=3), ["query", "value"], 4, 8.0, lora_dropout,
                      dropout_width=dropout_width)


def random_state(m: LocalModel, layers) -> dict:
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


def plain_logits(m: LocalModel, b):
    return m.peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


LENGTHS = [5, 9, 9, 3, 12, 20, 9, 17]


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


def test_frozen_layers_and_embeddings_run_without_dropout():
    m = tiny_model()
    m.train_mode(2)
    inner = m.peft.base_model.model
    assert not any(mod.training for i in (0, 1) for mod in m.layers[i].modules())
    assert not inner.bert.embeddings.dropout.training
    assert m.layers[2].attention.self.training  # decides attention dropout of a trained layer


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
    from hierfedlora import packed

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


def test_cached_and_uncached_engines_are_identical(tiny_cfg):
    topk = {"method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 3, "train.local_steps": 3}
    runs = {}
    for name, extra in {"cached": {}, "uncached": {"train.prefix_cache": False},
                        "on disk": {"train.cache_memory_mb": 0}}.items():
        sim = Simulation(tiny_cfg(**topk, **extra))
        runs[name] = (sim.run(), sim.state, sim)
    assert runs["cached"][2].prefix_boundary == 2 and runs["uncached"][2].prefix_boundary == 0
    cache = runs["on disk"][2].model.prefix
    assert cache.bytes_in_memory == 0 and cache.bytes_on_disk > 0
    for name in ("uncached", "on disk"):
        assert runs[name][0] == runs["cached"][0]  # every metric of every round, exactly
        assert all(torch.equal(runs[name][1][k], runs["cached"][1][k]) for k in runs["cached"][1])


def test_engine_job_equals_a_plain_loop_padded_to_max_length(tiny_cfg):
    """One device job through the engine (packed, cached, masks drawn for max_length padding) and
    the same job written the usual way (PEFT forward on batches padded to max_length)."""
    cfg = tiny_cfg(**{"method.name": "fedlora_topk", "method.depth": 2, "model.max_length": 24, "train.local_steps": 4})
    sim = Simulation(cfg)
    m, w = sim.model, sim.work
    m.dropout_width = cfg.model.max_length
    plan = DevicePlan(0, sim.global_ranks, (2, 3), 4)
    data = DeviceData(w.ids, w.labels, w.parts[0], w.pad_id)
    settings = LocalTraining(seed=0, batch_size=cfg.train.batch_size, lr=cfg.train.lr, weight_decay=0.0, backward_ratio=1.0)
    sim.evaluate(sim.state, sim.test_batches)  # fill part of the cache first
    fast = run_job(m, data, DeviceJob(plan, dict(sim.state), 0), 1, settings).update

    packed, m.packed = m.packed, None  # the plain transformers forward
    from hierfedlora.trainer import sample_batches, torch_seed
    m.load(dict(sim.state), plan.ranks, plan.train_layers)
    m.train_mode(2)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=cfg.train.lr)
    torch.manual_seed(torch_seed((0, 5005, 1, 0, 0)))
    for pick in sample_batches(w.parts[0], 4, cfg.train.batch_size, (0, 4004, 1, 0, 0)):
        b = collate([w.ids[i] for i in pick], w.labels[pick], w.pad_id)
        pad = cfg.model.max_length - b["input_ids"].shape[1]
        loss = F.cross_entropy(m.peft(input_ids=F.pad(b["input_ids"], (0, pad)),
                                      attention_mask=F.pad(b["attention_mask"], (0, pad))).logits, b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    plain = m.extract(plan.train_layers, plan.ranks)
    m.packed = packed
    # float noise: ~1e-3 of the update (Adam magnifies it where gradients start at 0, as A's do);
    # a different dropout mask or a wrong layer: ~0.2 to 2
    err = sum(float((fast[k] - plain[k]).norm()) ** 2 for k in plain) ** 0.5
    update = sum(float((plain[k] - sim.state[k]).norm()) ** 2 for k in plain) ** 0.5
    assert err <= 1e-2 * update


TOPK = {"method.name": "fedlora_topk", "method.depth": 2}


@pytest.mark.parametrize("method,below", [(TOPK, False),  # top layers, the cache below them
                                          (TOPK, True),  # device 1's LoRA below the cache is not zero
                                          ({"method.name": "fedlora", "model.lora_dropout": 0.1}, False)])  # all, LoRA dropout
def test_devices_trained_together_get_exactly_what_they_get_alone(tiny_cfg, method, below):
    from hierfedlora.lora_state import layer_of
    from hierfedlora.trainer import lockstep_groups, run_jobs

    sim = Simulation(tiny_cfg(**method, **{"train.batch_size": 16, "train.local_steps": 3}))
    m, w = sim.model, sim.work
    layers = tuple(sorted(sim.strategy.layers)) if hasattr(sim.strategy, "layers") else tuple(range(m.num_layers))
    ranks = {l: 4 for l in range(m.num_layers)}  # LoRA everywhere, zero where nothing trains
    start = m.init_state(ranks)
    g = torch.Generator().manual_seed(1)
    jobs = []
    for d in range(4):  # each device from its own state (as after some training), so their factors differ
        moved = [k for k in start if layer_of(k) is None or layer_of(k) in layers or (below and d == 1)]
        state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k in moved else v for k, v in start.items()}
        plan = DevicePlan(d, ranks, layers, 3)
        jobs.append((DeviceData(w.ids, w.labels, w.parts[d], w.pad_id), DeviceJob(plan, to_device(state, ranks, ranks), 0)))
    kw = dict(seed=0, batch_size=16, lr=2e-2, weight_decay=0.01, backward_ratio=1.0)
    assert lockstep_groups(m, [j.plan for _, j in jobs[:3]], [len(d.positions) for d, _ in jobs], 16, 3) == [[0, 1, 2]]
    three, one = LocalTraining(**kw, lockstep=3), LocalTraining(**kw)
    together = run_jobs(m, jobs[:3], 1, three) + run_jobs(m, jobs[3:], 1, three)
    alone = [run_jobs(m, [j], 1, one)[0] for j in jobs]
    for a, t in zip(alone, together):
        assert a.train_loss == t.train_loss and a.flops == t.flops
        assert a.update.keys() == t.update.keys()
        assert all(torch.equal(a.update[k], t.update[k]) for k in a.update), [k for k in a.update if not torch.equal(a.update[k], t.update[k])]
    assert not torch.equal(alone[0].update["head.classifier.weight"], alone[1].update["head.classifier.weight"])
    if method is TOPK:
        assert m.prefix is not None and len(m.prefix) > 0  # the cached path ran


def test_only_jobs_of_one_plan_shape_train_together():
    from hierfedlora.trainer import lockstep_groups

    m = tiny_model()
    r = {l: 4 for l in range(4)}
    plans = [DevicePlan(0, r, (2, 3), 3), DevicePlan(1, r, (2, 3), 3), DevicePlan(2, r, (3,), 3),
             DevicePlan(3, r, (3,), 3), DevicePlan(4, r, (3,), 2), DevicePlan(5, r, (3,), 2, options={"mu": 0.1})]
    assert lockstep_groups(m, plans, [40] * 6, 16, 4) == [[0, 1], [2, 3], [4], [5]]
    assert lockstep_groups(m, plans[:4], [40, 40, 40, 12], 16, 4) == [[0, 1], [2], [3]]  # a batch under MIN_ROWS
    assert lockstep_groups(m, plans[:2], [40, 40], 16, 1) == [[0], [1]]
    ten = [DevicePlan(i, r, (3,), 3) for i in range(10)]
    assert lockstep_groups(m, ten, [40] * 10, 16, 8) == [list(range(5)), list(range(5, 10))]  # even, not 8 + 2
    assert lockstep_groups(m, ten[:7], [40] * 7, 16, 3) == [[0, 1], [2, 3], [4, 5, 6]]


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
    assert m.prefix is cache

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
    assert sim.global_ranks == {3: 4} and sim.strategy.lowest_trainable_layer() == 3 and sim.prefix_boundary == 3
    row = sim.step()
    lay = sim.model.layout
    assert row["participants"] > 0
    assert row["bytes_up"] == row["participants"] * (lay.params_per_rank(3) * 4 + lay.head_params()) * 4


def test_architectures_without_a_packed_forward_keep_the_plain_one(tiny_cfg):
    sim = Simulation(tiny_cfg(**{"model.name": "tiny-llama", "model.target_modules": ["q_proj", "v_proj"],
                                 "method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 1}))
    assert sim.model.packed is None and sim.prefix_boundary == 0
    assert "test_acc" in sim.step()


def test_device_jobs_in_worker_processes_give_the_same_run(tiny_cfg):
    topk = {"method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 2, "fleet.num_devices": 5, "train.threads": 1}
    here = Simulation(tiny_cfg(**topk))
    pool = Simulation(tiny_cfg(**topk, **{"train.workers": 2}))
    assert type(pool.executor).__name__ == "ProcessExecutor"
    assert here.run() == pool.run()
    assert all(torch.equal(here.state[k], pool.state[k]) for k in here.state)
    ex = pool.executor
    # every device's examples are booked on the worker its last job ran on, and each worker
    # reported time for the work it did
    assert ex.home and all(w in (0, 1) for w in ex.home.values())
    for d, w in ex.home.items():
        assert set(pool.work.parts[d].tolist()) & ex.cached[w]
    ran = set().union(*ex.cached)
    assert set(pool.work.test.tolist()) <= ran <= set(pool.work.train.tolist()) | set(pool.work.test.tolist())
    assert all(r.seconds > 1e-3 and r.flops > 5e7 for r in (ex.rates["train"], ex.rates["eval"]))
    ex.close()
    assert not any(p.is_alive() for p in ex.procs)


def test_place_keeps_items_home_unless_a_move_shortens_the_longest_worker():
    from hierfedlora.parallel import place

    # all at home on worker 0 (7 s against 0): moving item 0 (3 s there, 4 s on worker 1) gives 4 | 4
    assert place([[3, 4], [3, 4], [1, 1.5]], [0, 0, 0]) == [1, 0, 0]
    # a move that only evens the load without shortening the longest worker is not made
    assert place([[2, 2], [2, 2]], [0, 1]) == [0, 1]
    # cached examples make a move dear: 5 | 4 at home; item 0 away costs 3 (5 -> 2 | 7): stays
    assert place([[1, 3], [4, 5], [4, 4]], [0, 0, 1]) == [0, 0, 1]
    # three workers, one overloaded: its items spread while that shortens the round
    where = place([[2, 2, 2]] * 6, [0] * 6)
    assert sorted(where.count(w) for w in range(3)) == [2, 2, 2]
    assert place([], []) == [] and place([[1.0]], [0]) == [0]


def test_lend_moves_first_passes_from_the_longest_worker_while_that_shortens_it():
    from hierfedlora.parallel import lend

    # 10 s against 4: move 1 s passes from worker 0, latest needed first, until 7 | 7
    due = [[(7, 1.0), (8, 1.0), (9, 1.0), (10, 1.0)], []]
    assert lend([10.0, 4.0], due) == [(7, 0, 1), (8, 0, 1), (9, 0, 1)]
    # a pass bigger than half the gap would only swap which worker is longest: none moves
    assert lend([10.0, 8.0], [[(1, 1.5)], []]) == []
    # a gap below min_gap is left alone; nothing due, nothing moves
    assert lend([1.0, 0.99], [[(1, 0.001)], []]) == [] and lend([5.0, 0.0], [[], []]) == []
    # three workers: the longest gives to whichever is shortest at each move
    assert lend([6.0, 0.0, 1.0], [[(1, 1.0), (2, 1.0), (3, 1.0)], [], []]) == [(1, 0, 1), (2, 0, 1), (3, 0, 2)]


def test_first_passes_computed_by_another_worker_give_the_same_run(tiny_cfg, monkeypatch):
    from hierfedlora import parallel

    # every job on worker 0: worker 1 has nothing to train, so it passes worker 0's new examples
    # through the frozen layers and they are sent over; the run must not change by a bit
    monkeypatch.setattr(parallel, "place", lambda costs, home: [0] * len(costs))
    monkeypatch.setattr(parallel.ProcessExecutor, "MIN_GAP", 0.0)  # the tiny model's gaps are microseconds
    topk = {"method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 2, "fleet.num_devices": 5, "train.threads": 1}
    here = Simulation(tiny_cfg(**topk))
    pool = Simulation(tiny_cfg(**topk, **{"train.workers": 2}))
    assert here.run() == pool.run()
    assert all(torch.equal(here.state[k], pool.state[k]) for k in here.state)
    ex = pool.executor
    assert ex.lent > 0
    assert ex.rates["prefix"].flops > 5e7  # the helper's time was booked
    ex.close()


@pytest.mark.parametrize("where", ["job", "lent rows"])
def test_work_failing_in_a_worker_stops_the_round_with_its_error(tiny_cfg, monkeypatch, where):
    import time

    from hierfedlora import engine, parallel

    # worker 1 lends to worker 0; a job of worker 0, or the rows worker 1 computes for it, fail:
    # the error must come back at once (not a worker left waiting for rows that will not come),
    # and the workers are stopped for a fresh start
    monkeypatch.setattr(parallel, "place", lambda costs, home: [0] * len(costs))
    monkeypatch.setattr(parallel.ProcessExecutor, "MIN_GAP", 0.0)
    if where == "job":
        real = engine.run_jobs

        def flaky(model, jobs, rnd, settings):
            if any(job.plan.device == 4 for _, job in jobs):
                raise ValueError("device 4 broke")
            return real(model, jobs, rnd, settings)

        monkeypatch.setattr(engine, "run_jobs", flaky)
    else:
        def broken(self, ids):
            raise ValueError("device 4 broke")  # the message the test expects, whichever fails

        monkeypatch.setattr(LocalModel, "prefix_rows", broken)
    topk = {"method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 1, "fleet.num_devices": 5,
            "train.threads": 1, "train.workers": 2}
    sim = Simulation(tiny_cfg(**topk))
    ex = sim.executor
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="device 4 broke"):
        sim.step()
    assert time.monotonic() - start < 60
    assert ex.conns == [] and ex.procs == [] and not ex.home
