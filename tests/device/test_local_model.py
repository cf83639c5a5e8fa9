"""The plain device runtime on its own: a tiny model takes plans, trains, is evaluated, with the
plain transformers forward (no `hierfedlora.fast`)."""

import numpy as np
import pytest
import torch

from hierfedlora.data import collate
from hierfedlora.device.executor import LocalExecutor
from hierfedlora.device.model import LocalModel, load_base, load_tokenizer, resolve_device
from hierfedlora.device.train import FleetData, evaluate, run_job
from hierfedlora.lora_state import to_device
from hierfedlora.protocol import DeviceJob, DevicePlan, LocalTraining


def tiny_model() -> LocalModel:
    tok = load_tokenizer("tiny-bert")
    return LocalModel(load_base("tiny-bert", 2, tok, seed=3), ["query", "value"], 4, 8.0)


def tiny_fleet(n_devices=2, per_device=24, seed=0) -> FleetData:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1000, 3000, size=int(rng.integers(3, 12))).astype(np.int32) for _ in range(n_devices * per_device)]
    labels = rng.integers(0, 2, size=len(ids))
    parts = [np.arange(d * per_device, (d + 1) * per_device) for d in range(n_devices)]
    return FleetData(ids, labels, parts, 0)


def test_layers_found_in_llama_style_models():
    tok = load_tokenizer("tiny-llama")
    m = LocalModel(load_base("tiny-llama", 3, tok), ["q_proj", "v_proj"], 4, 8.0)
    assert m.layout.num_layers == 4 and set(m.layout.modules) == {"self_attn.q_proj", "self_attn.v_proj"}
    assert m.layout.modules["self_attn.v_proj"] == (32, 16)  # grouped-query attention: 2 of 4 heads
    assert m.cost.mlp_matrices == 3
    state = m.init_state({3: 4})
    assert set(k.split(".")[0] for k in state if not k.startswith("head")) == {"3"}


def test_frozen_layers_and_embeddings_run_without_dropout():
    m = tiny_model()
    m.train_mode(2)
    inner = m.peft.base_model.model
    assert not any(mod.training for i in (0, 1) for mod in m.layers[i].modules())
    assert not inner.bert.embeddings.dropout.training
    assert m.layers[2].attention.self.training  # decides attention dropout of a trained layer


def test_plain_logits_are_the_peft_forward_and_prepare_changes_nothing():
    m = tiny_model()
    ranks = {l: 4 for l in range(4)}
    m.load(m.init_state(ranks), ranks, (2, 3))
    m.eval_mode()
    rng = np.random.default_rng(1)
    b = collate([rng.integers(1000, 3000, size=n).astype(np.int32) for n in (5, 9, 3)], np.array([0, 1, 0]), 0)
    with torch.no_grad():
        want = m.peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        m.prepare([b])  # the declared hook: a no-op on the plain model
        assert torch.equal(m.logits(b), want)


def test_a_job_trains_only_its_layers_and_the_executor_gives_what_run_job_gives():
    data = tiny_fleet()
    settings = LocalTraining(seed=0, batch_size=8, lr=5e-2, weight_decay=0.0, backward_ratio=1.0)
    ranks = {l: 4 for l in range(4)}
    a, b = tiny_model(), tiny_model()
    state = a.init_state(ranks)
    job = DeviceJob(DevicePlan(1, ranks, (3,), 3), to_device(state, ranks, ranks), 0)
    out = run_job(a, data.device(1), job, 1, settings)
    assert sorted({k.split(".")[0] for k in out.update}) == ["3", "head"]  # trained layers + head
    assert out.num_examples == 24 and out.flops > 0 and np.isfinite(out.train_loss)
    assert not torch.equal(out.update["3.attention.self.query.B"], state["3.attention.self.query.B"])
    ex = LocalExecutor(b, data, settings)
    (again,) = ex.run(1, [job])
    assert again.train_loss == out.train_loss and all(torch.equal(again.update[k], out.update[k]) for k in out.update)
    batches = [collate([data.ids[i] for i in p], data.labels[p], 0) for p in data.parts]
    assert ex.evaluate(job.payload, ranks, batches) == (b.load(job.payload, ranks, ()) or evaluate(b, batches))


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
    else:  # a device this machine lacks is refused by name, with the fix
        with pytest.raises(ValueError, match=r'train.device = "cuda" but .*use train.device = "cpu"'):
            resolve_device("cuda")


def test_wrapping_a_model_in_peft_prints_no_deprecation_warning_of_peft():
    """PEFT asks transformers' deprecated `is_gradient_checkpointing`; a run must not print it, and
    any other warning must still come through."""
    import warnings

    from hierfedlora.device.model import quiet_peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_model()
        with quiet_peft():
            warnings.warn("something else", FutureWarning)
    messages = [str(w.message) for w in caught]
    assert not any("is_gradient_checkpointing" in m for m in messages), messages
    assert "something else" in messages
