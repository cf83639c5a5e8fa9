import numpy as np
import pytest

from hierfedlora.grouping import (group_devices, grouping_report, kl_rows, objective, pooled_kl, random_groups,
                                  resource_spread, size_bounds)
from hierfedlora.partition import label_histograms, partition


@pytest.fixture(scope="module")
def dirichlet80() -> tuple[np.ndarray, np.ndarray]:
    """80 devices, Dirichlet(0.1) over 10 classes (20k labels, enough for flwr at small alpha),
    and log-normal predicted round times spanning ~20x."""
    labels = np.random.default_rng(0).integers(0, 10, size=20_000)
    parts = partition(labels, 80, "dirichlet", alpha=0.1, seed=0)
    times = np.exp(np.random.default_rng(1).normal(0.0, 1.0, size=80))
    return label_histograms(labels, parts, 10), times


def test_kl_hand_computed():
    # KL([.5,.5] ‖ [.25,.75]) = .5 ln 2 + .5 ln(2/3)
    got = kl_rows(np.array([[1.0, 1.0]]), np.array([0.25, 0.75]))[0]
    assert got == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3))
    assert kl_rows(np.array([[0.0, 3.0]]), np.array([0.0, 1.0]))[0] == 0.0  # 0·log 0 = 0


def test_groups_are_near_iid_far_below_random(dirichlet80):
    hists, times = dirichlet80
    groups = group_devices(hists, times, 8, lam=0.0, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(80))
    assert [len(g) for g in groups] == [10] * 8
    mean_kl = np.mean([pooled_kl(hists, g) for g in groups])
    rand_kl = np.mean([np.mean([pooled_kl(hists, g) for g in random_groups(80, 8, seed=s)]) for s in range(5)])
    assert mean_kl < 0.25 * rand_kl, (mean_kl, rand_kl)
    assert group_devices(hists, times, 8, lam=0.0, seed=0) == groups  # seeded


def test_lambda_lowers_resource_spread(dirichlet80):
    hists, times = dirichlet80
    spread = {lam: np.mean([resource_spread(times, g) for g in group_devices(hists, times, 4, lam=lam, seed=0)])
              for lam in (0.0, 0.1, 1.0)}
    assert spread[0.1] < 0.75 * spread[0.0] and spread[1.0] < 0.5 * spread[0.0], spread


def test_balance_and_report(dirichlet80):
    hists, times = dirichlet80
    assert size_bounds(80, 6, 0.0) == (13, 14) and size_bounds(80, 4, 0.5) == (10, 30)
    for slack in (0.0, 0.5):
        lo, hi = size_bounds(80, 6, slack)
        groups = group_devices(hists, times, 6, lam=0.05, size_slack=slack, seed=1)
        assert all(lo <= len(g) <= hi for g in groups)
    rep = grouping_report(hists, times, groups, 0.05)
    assert rep["objective"] == pytest.approx(objective(hists, times, groups, 0.05))
    assert rep["mean_kl"] < rep["random_mean_kl"]
    for r in rep["groups"]:
        assert r["slowest_round_s"] == pytest.approx(max(times[r["members"]]))
        assert r["fastest_round_s"] == pytest.approx(min(times[r["members"]]))
        assert r["num_examples"] == hists[r["members"]].sum()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_groups"):
        group_devices(np.ones((3, 2)), [1.0, 1.0, 1.0], 4)
    with pytest.raises(ValueError, match="positive"):
        group_devices(np.ones((3, 2)), [1.0, 0.0, 1.0], 2)
