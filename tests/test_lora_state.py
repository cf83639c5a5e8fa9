import torch

from hierfedlora.lora_state import delta_w, from_device, num_bytes, to_device


def test_truncation_keeps_delta_w_of_the_sent_slots():
    g = torch.Generator().manual_seed(1)
    R, r, alpha = 4, 2, 8.0
    state = {"0.q.A": torch.randn(R, 6, generator=g), "0.q.B": torch.randn(5, R, generator=g), "head.w": torch.ones(2)}
    dev = to_device(state, {0: r}, {0: R})
    assert dev["0.q.A"].shape == (r, 6) and dev["0.q.B"].shape == (5, r)
    # the device runs scale alpha/r; the server's first r slots at scale alpha/R give the same ΔW
    server_part = (alpha / R) * state["0.q.B"][:, :r] @ state["0.q.A"][:r]
    assert torch.allclose(delta_w(dev, 0, "q", alpha, r), server_part, atol=1e-6)
    back = from_device(dev, {0: r}, {0: R})
    assert torch.allclose(back["0.q.B"], state["0.q.B"][:, :r]) and torch.equal(back["head.w"], state["head.w"])


def test_rank_zero_layers_are_not_sent_and_bytes_count_tensors():
    state = {"0.q.A": torch.zeros(4, 6), "0.q.B": torch.zeros(5, 4), "1.q.A": torch.zeros(4, 6),
             "1.q.B": torch.zeros(5, 4), "head.w": torch.zeros(3, 7)}
    dev = to_device(state, {1: 3}, {0: 4, 1: 4})
    assert set(dev) == {"1.q.A", "1.q.B", "head.w"}
    assert num_bytes(dev, 4) == 4 * (3 * 6 + 5 * 3 + 21)
    assert num_bytes(dev, 2, keys=["head.w"]) == 42


def test_head_and_layers_keeps_the_head_and_the_given_layers_in_order():
    from hierfedlora.lora_state import head_and_layers

    keys = ["0.q.A", "0.q.B", "1.q.A", "head.classifier.weight", "2.v.B", "head.classifier.bias"]
    assert head_and_layers(keys, [2, 0]) == ["0.q.A", "0.q.B", "head.classifier.weight", "2.v.B", "head.classifier.bias"]
    assert head_and_layers(keys, []) == ["head.classifier.weight", "head.classifier.bias"]
