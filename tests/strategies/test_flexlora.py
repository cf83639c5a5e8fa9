import pytest
import torch

from hierfedlora.aggregate import svd_factors, svd_redistribute, weighted_delta_w
from hierfedlora.engine import Simulation
from hierfedlora.lora_state import delta_w, from_device, to_device

ALPHA = 8.0


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def test_weighted_delta_w_hand_computed_with_mixed_ranks_and_layers():
    # server rank R = 2 in layers 0 and 1; device 1 rank 1 in both layers, device 2 rank 2 in layer 1 only
    G = {0: 2, 1: 2}
    dev1 = {"0.q.A": torch.tensor([[1.0, 0.0]]), "0.q.B": torch.tensor([[2.0]]),
            "1.q.A": torch.tensor([[0.0, 1.0]]), "1.q.B": torch.tensor([[1.0]])}
    dev2 = {"1.q.A": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "1.q.B": torch.tensor([[3.0, 1.0]])}
    ups = [from_device(dev1, {0: 1, 1: 1}, G), from_device(dev2, {1: 2}, G)]
    got = weighted_delta_w(ups, [1.0, 3.0], ALPHA, G)
    # device ΔW at its own scale α/r: dev1 layer 0: 8·[2]·[1 0] = [16 0]; layer 1: 8·[0 1] = [0 8]
    # dev2 layer 1: 4·[3 1] = [12 4]. Layer 0 only dev1 (p = 1); layer 1: (1·[0 8] + 3·[12 4]) / 4 = [9 5]
    assert torch.allclose(got[(0, "q")], torch.tensor([[16.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(got[(1, "q")], torch.tensor([[9.0, 5.0]], dtype=torch.float64))


def test_svd_factors_reproduce_delta_w_at_full_rank_and_best_approximation_below():
    out_f, in_f, R = 7, 6, 6
    # an aggregate of two devices' updates of ranks 2 and 3: rank 5 ≤ R
    delta = (rand(out_f, 2, seed=1) @ rand(2, in_f, seed=2) + rand(out_f, 3, seed=3) @ rand(3, in_f, seed=4)).double()
    a, b = svd_factors(delta, R, ALPHA)
    state = {"0.q.A": a.float(), "0.q.B": b.float()}
    assert torch.allclose(delta_w(state, 0, "q", ALPHA, R).double(), delta, atol=1e-5)  # (α/R)·B·A = ΔW
    # equal scale in both factors: column j of B and row j of A have the same norm sqrt(R σ_j / α)
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), atol=1e-9)
    s = torch.linalg.svdvals(delta)
    for r in range(1, R + 1):
        dev = to_device(state, {0: r}, {0: R})  # what device k receives (B rescaled to its scale α/r)
        approx = delta_w(dev, 0, "q", ALPHA, r).double()
        u, sv, vh = torch.linalg.svd(delta)
        best = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
        assert torch.allclose(approx, best, atol=1e-5)
        # Eckart-Young: the error is the tail of the spectrum, and no other rank-r matrix does better
        assert (delta - approx).norm() == pytest.approx(float(s[r:].square().sum().sqrt()), abs=1e-5)
        other = rand(out_f, r, seed=10 + r).double() @ rand(r, in_f, seed=20 + r).double()
        assert (delta - other).norm() > (delta - approx).norm()
    # rank(ΔW) = 5: five slots already reproduce it exactly
    assert torch.allclose(delta_w(to_device(state, {0: 5}, {0: R}), 0, "q", ALPHA, 5).double(), delta, atol=1e-5)


def test_svd_redistribute_keeps_untouched_modules_and_averages_the_head():
    G = {0: 3, 1: 3}
    base = {"0.q.A": rand(3, 4, seed=1), "0.q.B": rand(5, 3, seed=2), "1.q.A": rand(3, 4, seed=3),
            "1.q.B": rand(5, 3, seed=4), "head.w": torch.tensor([0.0, 0.0])}
    u1 = {"1.q.A": rand(2, 4, seed=5), "1.q.B": rand(5, 2, seed=6), "head.w": torch.tensor([1.0, 2.0])}
    u2 = {"1.q.A": rand(3, 4, seed=7), "1.q.B": rand(5, 3, seed=8), "head.w": torch.tensor([3.0, 6.0])}
    out = svd_redistribute(base, [u1, u2], [{1: 2}, {1: 3}], [1.0, 3.0], ALPHA, G)
    assert torch.equal(out["0.q.A"], base["0.q.A"]) and torch.equal(out["0.q.B"], base["0.q.B"])
    assert torch.allclose(out["head.w"], torch.tensor([2.5, 5.0]))  # (1·[1 2] + 3·[3 6]) / 4
    want = weighted_delta_w([u1, u2], [1.0, 3.0], ALPHA, G)[(1, "q")]
    u, s, vh = torch.linalg.svd(want)
    assert torch.allclose(delta_w(out, 1, "q", ALPHA, 3).double(), u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5)
    with pytest.raises(ValueError, match="mask declares"):
        svd_redistribute(base, [u1], [{1: 3}], [1.0], ALPHA, G)


def test_flexlora_runs_with_heterogeneous_ranks_and_keeps_svd_form(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"method.name": "flexlora", "method.rank_min": 1, "run.rounds": 2, "fleet.num_devices": 6})
    sim = Simulation(cfg)
    assert len(set(sim.strategy.ranks)) > 1 and max(sim.strategy.ranks) == 4 and min(sim.strategy.ranks) == 1
    rows = sim.run()
    ranks = {c["device"]: c["ranks"][0] for c in rows[-1]["device_config"]}
    assert ranks == dict(enumerate(sim.strategy.ranks))
    # the server state is in SVD form: per module, B's column norms equal A's row norms
    for key in sim.state:
        if key.endswith(".A"):
            a, b = sim.state[key], sim.state[key[:-1] + "B"]
            assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-3, atol=1e-6)
