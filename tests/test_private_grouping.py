import numpy as np
import pytest
from scipy import stats

from hierfedlora.grouping import group_by, group_devices, objective, pooled_kl, random_groups, size_bounds
from hierfedlora.partition import label_histograms, partition
from hierfedlora.private_grouping import (SENSITIVITY, RefusedQuery, SecureSum, laplace_scale, ldp_histograms,
                                          masked_contributions, perturb_counts, pooled_grouping, project_to_simplex,
                                          random_projection, secure_sum, sketch_statistic)


@pytest.fixture(scope="module")
def dirichlet80() -> tuple[np.ndarray, np.ndarray]:
    """80 devices, Dirichlet(0.1) over 10 classes, log-normal round times (as tests/test_grouping.py)."""
    labels = np.random.default_rng(0).integers(0, 10, size=20_000)
    parts = partition(labels, 80, "dirichlet", alpha=0.1, seed=0)
    times = np.exp(np.random.default_rng(1).normal(0.0, 1.0, size=80))
    return label_histograms(labels, parts, 10), times


def _kl_sum(hists, groups) -> float:
    return sum(pooled_kl(hists, g) for g in groups)


# -- local DP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.1, 1.0, 10.0])
def test_ldp_noise_scale_matches_epsilon(eps):
    noise = perturb_counts(np.zeros((20_000, 3)), eps, seed=0)
    # Lap(b), b = Δ/ε: std √2·b, mean |x| = b, per count and across devices
    assert noise.std() == pytest.approx(np.sqrt(2) * SENSITIVITY / eps, rel=0.02)
    assert np.abs(noise).mean() == pytest.approx(SENSITIVITY / eps, rel=0.02)
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 0.03  # independent counts
    assert perturb_counts(np.zeros((5, 3)), eps, seed=0).tolist() == noise[:5].tolist()  # seeded per device


def test_ldp_density_ratio_is_bounded_by_e_to_the_epsilon():
    """ε-DP for neighbours h, h' (one example's label replaced): p(y|h)/p(y|h') ≤ e^ε at every output
    y, with equality where y lies beyond both on the moved coordinates."""
    eps = 0.7
    b = laplace_scale(eps)
    h, h2 = np.array([5.0, 3.0, 0.0]), np.array([4.0, 4.0, 0.0])  # one label replaced: L1 distance 2 = Δ
    ys = np.array([[5.0, 3.0, 0.0], [4.5, 3.5, 1.0], [100.0, -50.0, 2.0], [-3.0, 9.0, 0.0], [4.0, 4.0, 7.0]])
    log_ratio = (stats.laplace.logpdf(ys, h, b).sum(1) - stats.laplace.logpdf(ys, h2, b).sum(1))
    assert np.all(np.abs(log_ratio) <= eps + 1e-12)
    assert np.max(np.abs(log_ratio)) == pytest.approx(eps)  # the bound is attained: no slack in Δ/ε
    # the empirical law of the mechanism is that Laplace (Kolmogorov–Smirnov)
    draws = perturb_counts(np.tile(h, (4000, 1)), eps, seed=3)[:, 0]
    assert stats.kstest(draws, stats.laplace(h[0], b).cdf).pvalue > 0.01


def test_ldp_upload_is_a_histogram_of_the_same_size():
    hists = np.array([[5.0, 3.0, 0.0], [0.0, 0.0, 7.0], [1.0, 1.0, 1.0]])
    for eps in (0.1, 1.0):
        up = ldp_histograms(hists, eps, seed=0)
        assert np.all(up >= 0) and np.allclose(up.sum(1), hists.sum(1))
    assert np.array_equal(ldp_histograms(hists, None, 0), hists)  # ε = ∞: the exact counts
    assert np.allclose(project_to_simplex(np.array([2.0, -1.0, 0.5]), 2.0), [1.75, 0.0, 0.25])  # hand-computed θ = 0.25


# -- secure aggregation ----------------------------------------------------------------------------

def test_oracle_refuses_sets_of_fewer_than_two(dirichlet80):
    hists, _ = dirichlet80
    oracle = SecureSum(hists, seed=0)
    with pytest.raises(RefusedQuery):
        oracle.pooled([[0, 1, 2], [3]])
    with pytest.raises(RefusedQuery):
        oracle.pooled([[4, 4]])  # one device twice is still one device
    assert oracle.releases == 0  # a refused query releases nothing
    assert np.array_equal(oracle.pooled([[0, 1], [2, 3, 4]]), [hists[[0, 1]].sum(0), hists[[2, 3, 4]].sum(0)])
    assert oracle.releases == 1


def test_masked_sums_equal_plain_sums_and_single_contributions_look_uniform(dirichlet80):
    hists, _ = dirichlet80
    members = list(range(20))
    y = masked_contributions(hists[members], members, nonce=0, seed=0)
    assert np.array_equal(secure_sum(y), hists[members].sum(0))  # integers: exact
    vals = np.random.default_rng(0).normal(size=(20, 10)) * 100
    assert np.allclose(secure_sum(masked_contributions(vals, members, 1, 0)), vals.sum(0), atol=20 * 2.0 ** -16)
    # what the server sees of one device: uniform on Z_2^64, unrelated to its counts
    u = y.astype(np.float64).ravel() / 2.0 ** 64
    assert stats.kstest(u, "uniform").pvalue > 0.01
    assert abs(np.corrcoef(u, hists[members].ravel())[0, 1]) < 0.3
    y2 = masked_contributions(hists[members], members, nonce=1, seed=0)
    assert not np.any(y2 == y)  # fresh masks for each release


def test_pooled_grouping_on_masked_sums_equals_it_on_plain_sums(dirichlet80):
    hists, times = dirichlet80
    masked = pooled_grouping(hists, times, 4, lam=0.05, seed=0, max_passes=6)
    plain = pooled_grouping(hists, times, 4, lam=0.05, seed=0, max_passes=6, masked=False)
    assert masked == plain


def test_pooled_grouping_respects_sizes_lowers_j_and_comes_near_the_exact_greedy(dirichlet80):
    hists, times = dirichlet80
    for k, slack in ((4, 0.0), (5, 0.3)):
        res = pooled_grouping(hists, times, k, lam=0.05, size_slack=slack, seed=1, masked=False)  # same groups as masked
        lo, hi = size_bounds(80, k, slack)
        assert sorted(i for g in res.groups for i in g) == list(range(80))
        assert all(lo <= len(g) <= hi for g in res.groups)
        trace = res.objective_trace  # exact sums: the server's J is the true J
        assert all(b < a for a, b in zip(trace, trace[1:])) and len(trace) > 3
        assert trace[-1] == pytest.approx(objective(hists, times, res.groups, 0.05))
        assert res.releases <= 21 and res.epsilon_spent is None
    res = pooled_grouping(hists, times, 4, lam=0.0, seed=0, masked=False)
    exact, rand = _kl_sum(hists, group_devices(hists, times, 4, 0.0, seed=0)), _kl_sum(hists, random_groups(80, 4, 0))
    # measured: pooled 0.035, exact greedy 0.009, random 0.59
    assert _kl_sum(hists, res.groups) < min(5 * exact, 0.1 * rand)


def test_pooled_grouping_spends_its_epsilon_and_refuses_tiny_groups(dirichlet80):
    hists, times = dirichlet80
    res = pooled_grouping(hists, times, 4, seed=0, max_passes=9, epsilon=1.0)
    assert res.epsilon_spent == pytest.approx(res.releases * 0.1) and res.epsilon_spent <= 1.0 + 1e-12
    assert _kl_sum(hists, res.groups) < 0.5 * _kl_sum(hists, random_groups(80, 4, 0))
    with pytest.raises(ValueError, match="at least 2"):
        pooled_grouping(hists[:5], times[:5], 3)


# -- label-free sketches ----------------------------------------------------------------------------

def test_sketch_grouping_recovers_balanced_groups_of_a_planted_structure():
    """Four device types with distant mean embeddings: the balanced grouping puts one of each type in
    every group, which pooled-mean distance finds and random groups miss."""
    rng = np.random.default_rng(0)
    types = np.repeat(np.arange(4), 8)
    centres = rng.normal(size=(4, 64)) * 5
    emb = centres[types] + rng.normal(size=(32, 64)) * 0.3
    sketches = random_projection(emb, 16, seed=0)
    stat = sketch_statistic(sketches, np.full(32, 50))
    times = np.ones(32)
    groups = group_by(stat, times, 8, seed=0)
    assert all(sorted(types[g].tolist()) == [0, 1, 2, 3] for g in groups)

    def j(gs):
        return float(sum(stat.divergence(stat.rows[g].sum(0)) for g in gs))

    assert j(groups) < 0.05 * j(random_groups(32, 8, 0))
    # scale-free: a single device scores 1 on average
    assert np.mean([stat.divergence(r) for r in stat.rows]) == pytest.approx(1.0)


def test_random_projection_keeps_distances():
    x = np.random.default_rng(0).normal(size=(30, 384))
    s = random_projection(x, 256, seed=0)
    d0 = np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(30, 1)]
    d1 = np.linalg.norm(s[:, None] - s[None], axis=-1)[np.triu_indices(30, 1)]
    assert np.allclose(d1 / d0, 1.0, atol=0.2)
    assert np.array_equal(random_projection(x, 16, 3), random_projection(x, 16, 3))
