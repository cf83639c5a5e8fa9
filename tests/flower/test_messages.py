"""The wire format (hierfedlora.flower.messages): plans and tensors survive a round trip."""

from __future__ import annotations

import torch

from hierfedlora.flower import messages as wire
from hierfedlora.protocol import DevicePlan


def test_plan_and_state_survive_the_wire():
    plan = DevicePlan(3, {1: 2, 2: 4, 3: 4}, (2, 3), 5, link="lan", download="trained", options={"prune": 0.1},
                      frozen_factors=("A",))
    rec = wire.plan_record(plan, rnd=7, call=2, tag="t", base_tag="b")
    assert wire.plan_from_record(rec) == (plan, 7, 2)
    state = {"2.query.A": torch.randn(4, 8), "2.query.B": torch.randn(8, 4), "head.classifier.bias": torch.randn(2)}
    back = wire.record_to_state(wire.state_to_record(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert wire.tensor_bytes(wire.state_to_record(state)) == (32 + 32 + 2) * 4
