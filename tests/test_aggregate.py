import torch

from hierfedlora.aggregate import fedavg, slot_average


def test_fedavg_equals_hand_computed():
    a = {"0.q.A": torch.tensor([[1.0, 2.0]]), "head.w": torch.tensor([3.0])}
    b = {"0.q.A": torch.tensor([[3.0, 6.0]]), "head.w": torch.tensor([-1.0])}
    out = fedavg([a, b], [1, 3])
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5, (3 - 3)/4 = 0
    assert torch.allclose(out["0.q.A"], torch.tensor([[2.5, 5.0]]))
    assert torch.allclose(out["head.w"], torch.tensor([0.0]))


def test_slot_average_is_fedavg_for_full_updates():
    g = torch.Generator().manual_seed(0)
    base = {"0.q.A": torch.randn(3, 4, generator=g), "0.q.B": torch.randn(5, 3, generator=g), "head.w": torch.randn(2)}
    ups = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    w = [10, 20, 5]
    got, want = slot_average(base, ups, w), fedavg(ups, w)
    for k in base:
        assert torch.allclose(got[k], want[k], atol=1e-6)


def test_slot_average_mixed_ranks_and_missing_layers():
    base = {
        "0.q.A": torch.full((2, 1), 9.0), "0.q.B": torch.full((1, 2), 9.0),
        "1.q.A": torch.full((2, 1), 7.0), "1.q.B": torch.full((1, 2), 7.0),
        "head.w": torch.tensor([0.0]),
    }
    # device 1: rank 2 in layer 1 only; device 2: rank 1 in layer 1 only; layer 0 untouched
    u1 = {"1.q.A": torch.tensor([[1.0], [2.0]]), "1.q.B": torch.tensor([[1.0, 2.0]]), "head.w": torch.tensor([4.0])}
    u2 = {"1.q.A": torch.tensor([[3.0]]), "1.q.B": torch.tensor([[5.0]]), "head.w": torch.tensor([8.0])}
    out = slot_average(base, [u1, u2], [1.0, 3.0])
    # slot 0 held by both: (1*1 + 3*3)/4 = 2.5 (A), (1*1 + 3*5)/4 = 4 (B); slot 1 only by u1: 2 and 2
    assert torch.allclose(out["1.q.A"], torch.tensor([[2.5], [2.0]]))
    assert torch.allclose(out["1.q.B"], torch.tensor([[4.0, 2.0]]))
    assert torch.equal(out["0.q.A"], base["0.q.A"]) and torch.equal(out["0.q.B"], base["0.q.B"])
    assert torch.allclose(out["head.w"], torch.tensor([7.0]))  # (4 + 24)/4
