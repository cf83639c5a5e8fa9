"""The fast model computes what the plain path computes: a device job against a plain PEFT loop, and
architectures without a packed forward keep the plain one."""

import torch
import torch.nn.functional as F

from hierfedlora.data import collate
from hierfedlora.device.train import DeviceData, run_job
from hierfedlora.engine import Simulation
from hierfedlora.protocol import DeviceJob, DevicePlan, LocalTraining


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
    from hierfedlora.device.train import sample_batches, torch_seed
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


def test_architectures_without_a_packed_forward_keep_the_plain_one(tiny_cfg):
    sim = Simulation(tiny_cfg(**{"model.name": "tiny-llama", "model.target_modules": ["q_proj", "v_proj"],
                                 "method.name": "fedlora_topk", "method.depth": 2, "run.rounds": 1}))
    assert sim.model.packed is None and sim.cached_layers == 0
    assert "test_acc" in sim.step()
