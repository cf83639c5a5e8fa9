"""Grouping without raw label histograms at the server (SPEC §5 "private grouping"; docs/privacy.md).

HierFedLoRA's grouping (`grouping`) reads every device's label histogram h_i. Three inputs that
never give the server a raw h_i, each feeding the same objective J = Σ_k [D_k + λ·S_k]:

1. *Local DP* (`ldp_histograms`). Device i uploads h̃_i = Π_{n_i}(h_i + Lap(Δ/ε)^C): Laplace noise
   of scale b = Δ/ε on each count, then the Euclidean projection Π_{n_i} onto {x ≥ 0, Σx = n_i}.
   Neighbouring data sets: one example's label *replaced* (bounded DP), so the L1 sensitivity of a
   count vector is Δ = 2 (one count −1, another +1) and n_i is the same in both. n_i is not a
   secret we can keep anyway: FedAvg weights every update by it (`TrainResult.num_examples`), so
   using it costs no privacy; the projection is post-processing. The server groups on h̃ with the
   exact greedy.
2. *Secure aggregation* (`pooled_grouping`). The server only ever learns pooled sums Σ_{i∈S} h_i
   of sets |S| ≥ 2 (`SecureSum` refuses smaller sets), computed by pairwise-masked summation
   (`masked_contributions`), optionally with distributed Laplace noise inside the sum. The
   greedy becomes federated: devices evaluate their own moves against broadcast pooled sums.
3. *Label-free* (`sketch_statistic`). Device i sends s_i = R·μ_i, a seeded Gaussian random
   projection of its mean token embedding (no label enters), with n_i; D_k = ‖μ_k − μ‖² /
   mean_i ‖s_i − μ‖², the squared distance of group k's pooled mean sketch from the fleet's,
   scaled so a single device scores ≈ 1 on average (as KL does, λ keeps its meaning).

Everything is numpy and pure; every random draw derives from an explicit seed and the device,
pair or release it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hierfedlora.grouping import PooledStatistic, kl_rows, label_dist, random_groups, size_bounds

SENSITIVITY = 2.0  # L1 change of a label-count vector when one example's label is replaced
_FRAC_BITS = 16  # fixed-point precision of a secure-sum contribution: 2^-16
_TOL = 1e-12


# -- 1. local differential privacy ---------------------------------------------------------------

def laplace_scale(epsilon: float, sensitivity: float = SENSITIVITY) -> float:
    """b = Δ/ε: the Laplace scale that makes releasing f(x) + Lap(b) ε-DP for L1 sensitivity Δ."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (got {epsilon})")
    return sensitivity / epsilon


def perturb_counts(hists: np.ndarray, epsilon: float | None, seed: int) -> np.ndarray:
    """h_i + Lap(Δ/ε) per count, device i's draw seeded by (seed, i); ε = None: no noise.
    Std of each count's noise: √2·Δ/ε."""
    hists = np.asarray(hists, dtype=np.float64)
    if epsilon is None:
        return hists.copy()
    b = laplace_scale(epsilon)
    return np.stack([h + np.random.default_rng([seed, 7010, i]).laplace(0.0, b, size=h.shape)
                     for i, h in enumerate(hists)]) if len(hists) else hists.copy()


def project_to_simplex(v: np.ndarray, total: float) -> np.ndarray:
    """argmin_x ‖x − v‖₂ s.t. x ≥ 0, Σx = total: x = max(v − θ, 0) with θ the threshold that makes
    the sum right (sort-based: θ = (Σ_{j≤ρ} u_j − total)/ρ over u = v sorted descending)."""
    v = np.asarray(v, dtype=np.float64)
    if total <= 0:
        return np.zeros_like(v)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - total
    rho = np.flatnonzero(u - css / np.arange(1, len(u) + 1) > 0)[-1] + 1
    return np.maximum(v - css[rho - 1] / rho, 0.0)


def ldp_histograms(hists: np.ndarray, epsilon: float | None, seed: int) -> np.ndarray:
    """What the server holds under local DP: each device's noisy counts projected onto its
    simplex of n_i examples (module docstring, item 1)."""
    hists = np.asarray(hists, dtype=np.float64)
    noisy = perturb_counts(hists, epsilon, seed)
    return np.stack([project_to_simplex(v, h.sum()) for v, h in zip(noisy, hists)]) if len(hists) else noisy


# -- 2. secure aggregation -------------------------------------------------------------------------

class RefusedQuery(ValueError):
    """A pooled sum over fewer devices than the secure-sum oracle allows was asked for."""


def encode(values: np.ndarray) -> np.ndarray:
    """Fixed point in Z_{2^64}: round(v·2^16) as two's-complement uint64 (exact for integers)."""
    return np.round(np.asarray(values, dtype=np.float64) * 2.0 ** _FRAC_BITS).astype(np.int64).view(np.uint64)


def decode(u: np.ndarray) -> np.ndarray:
    """Inverse of `encode` for a sum: the int64 reading of u, times 2^-16."""
    return np.asarray(u, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0 ** _FRAC_BITS


def pair_mask(i: int, j: int, nonce: int, seed: int, size: int) -> np.ndarray:
    """m_ij: uniform in Z_{2^64}^size from a seed devices i and j share (key agreement in
    SecAgg; here derived from the unordered pair), fresh for each release `nonce`."""
    lo, hi = min(i, j), max(i, j)
    return np.random.default_rng([seed, 7011, nonce, lo, hi]).integers(0, 2 ** 64, size=size, dtype=np.uint64,
                                                                        endpoint=False)


def masked_contributions(values: np.ndarray, members: list[int], nonce: int, seed: int) -> np.ndarray:
    """What the server receives from each member of a secure sum (SecAgg's pairwise masking):
    y_i = enc(v_i) + Σ_{j>i} m_ij − Σ_{j<i} m_ji  (mod 2^64). Each y_i alone is uniform; the masks
    cancel in Σ_i y_i = Σ_i enc(v_i)."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    out = encode(values).copy()
    d = values.shape[1]
    for a, i in enumerate(members):
        for j in members:
            if j != i:
                m = pair_mask(i, j, nonce, seed, d)
                out[a] = out[a] + m if i < j else out[a] - m  # uint64 arithmetic wraps mod 2^64
    return out


def secure_sum(contributions: np.ndarray) -> np.ndarray:
    """Σ_i y_i mod 2^64, decoded: the members' plain sum (to 2^-16 per member for non-integers)."""
    return decode(np.sum(np.asarray(contributions, dtype=np.uint64), axis=0, dtype=np.uint64))


def noise_shares(size: int, members: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """One member's share of distributed Laplace noise: G − G' with G, G' ~ Gamma(1/m, b). The m
    members' shares sum to exactly Lap(b) (the Laplace law is infinitely divisible), so the sum is
    noised as a trusted curator would noise it while no one sees the noise-free sum."""
    return rng.gamma(1.0 / members, scale, size) - rng.gamma(1.0 / members, scale, size)


@dataclass
class SecureSum:
    """The server's only window on the devices' private rows (their label counts): the sum over
    each set of ≥ `min_set` devices, one `pooled` call (a *release*) at a time.

    `masked`: each member sends `masked_contributions` and the server adds them (SecAgg); False
    adds the rows directly (the same algorithm fed plain sums, for comparison). `epsilon`: each
    release is ε-DP for every device (distributed Laplace of scale Δ/ε in each sum; the sets of
    one release are disjoint, so by parallel composition one release costs ε, not ε·K); None: no
    noise. Dropout recovery (SecAgg's secret-shared masks) is not simulated: all devices are
    present at set-up."""

    rows: np.ndarray
    seed: int
    epsilon: float | None = None
    masked: bool = True
    min_set: int = 2
    releases: int = 0
    _rows: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rows = np.asarray(self.rows, dtype=np.float64)

    def pooled(self, sets: list[list[int]]) -> np.ndarray:
        """[len(sets), d] sums, one release. Refuses (RefusedQuery) a set smaller than `min_set`."""
        small = [len(s) for s in sets if len(set(s)) < self.min_set]
        if small:
            raise RefusedQuery(f"a pooled sum needs at least {self.min_set} devices; asked for a set of {min(small)}")
        nonce, self.releases = self.releases, self.releases + 1
        out = []
        for s in sets:
            vals = self._rows[s].copy()
            if self.epsilon is not None:
                b = laplace_scale(self.epsilon)
                vals += np.stack([noise_shares(vals.shape[1], len(s), b, np.random.default_rng([self.seed, 7012, nonce, i]))
                                  for i in s])
            out.append(secure_sum(masked_contributions(vals, list(s), nonce, self.seed)) if self.masked
                       else vals.sum(axis=0))
        return np.stack(out)


@dataclass(frozen=True)
class PooledGrouping:
    """The outcome of `pooled_grouping`: the groups, how many pooled-sum releases it used, the ε
    they spent in total (releases × ε per release; None: no noise), and J as the server saw it
    after each accepted step (exact J when the sums are exact)."""

    groups: list[list[int]]
    releases: int
    epsilon_spent: float | None
    objective_trace: list[float]


def _group_cost(counts: np.ndarray, p: np.ndarray, s1, s2, m, norm: float) -> np.ndarray:
    """KL(C_k ‖ P) + λ·Var_k(log t)/Var_all(log t) of pooled counts (negative noisy counts clipped)."""
    mm = np.maximum(m, 1)
    var = np.maximum(s2 / mm - (s1 / mm) ** 2, 0.0)
    return np.where(m > 0, kl_rows(np.maximum(counts, 0.0), p) + norm * var, 0.0)


def device_proposal(own: np.ndarray, x: float, a: int, pooled: np.ndarray, p: np.ndarray, s1: np.ndarray,
                    s2: np.ndarray, m: np.ndarray, norm: float) -> tuple[int, float]:
    """Device-side step (runs on the device, which knows its own counts `own` and log-time x):
    its best move out of group a against the broadcast pooled counts, ignoring size limits:
    ΔJ_b = cost(C_a − h) + cost(C_b + h) − cost(C_a) − cost(C_b); returns (b, ΔJ_b), ΔJ ≥ 0 when
    no move helps. Only (b, ΔJ_b) is uploaded."""
    old = _group_cost(pooled, p, s1, s2, m, norm)
    left = float(_group_cost(pooled[a] - own, p, s1[a] - x, s2[a] - x * x, m[a] - 1, norm))
    new = _group_cost(pooled + own, p, s1 + x, s2 + x * x, m + 1, norm)
    delta = left - old[a] + new - old
    delta[a] = np.inf
    b = int(np.argmin(delta))
    return b, float(delta[b])


def _select_changes(props: dict[int, tuple[int, float]], of: np.ndarray, sizes: np.ndarray, lo: int,
                    hi: int) -> list[tuple[float, tuple[int, ...]]]:
    """Server-side: J-lowering changes from the devices' proposals, best first, no device twice,
    sizes within [lo, hi]. Swaps pair the k-th best a→b proposer with the k-th best b→a one
    (estimated gain: the sum of the two moves' gains); a move stands alone where sizes allow."""
    want: dict[tuple[int, int], list[tuple[float, int]]] = {}
    for i, (b, g) in props.items():
        want.setdefault((int(of[i]), b), []).append((g, i))
    cands: list[tuple[float, tuple[int, ...]]] = [(g, (i,)) for (a, b), lst in want.items() for g, i in lst]
    for (a, b), lst in want.items():
        if a < b and (b, a) in want:
            for (gi, i), (gj, j) in zip(sorted(lst), sorted(want[(b, a)])):
                cands.append((gi + gj, (i, j)))
    cands.sort(key=lambda c: (c[0], c[1]))
    used: set[int] = set()
    m = sizes.copy()
    out = []
    for g, devs in cands:
        if g >= -_TOL or used & set(devs):
            continue
        if len(devs) == 1:
            i = devs[0]
            a, b = int(of[i]), props[i][0]
            if m[a] - 1 < lo or m[b] + 1 > hi:
                continue
            m[a] -= 1
            m[b] += 1
        used.update(devs)
        out.append((g, devs))
    return out


def pooled_grouping(rows: np.ndarray, times: np.ndarray | list[float], num_groups: int, lam: float = 0.0,
                    size_slack: float = 0.0, seed: int = 0, max_passes: int = 20, epsilon: float | None = None,
                    masked: bool = True) -> PooledGrouping:
    """Near-IID groups from pooled sums only (module docstring, item 2), federated K-means style.

    Start from seeded random groups (no label used). Each pass: (i) one release of the K groups'
    pooled counts through `SecureSum` (|group| ≥ 2); the server broadcasts them, P (their total)
    and each group's sums of log t (it knows the times); (ii) every device computes
    `device_proposal` and uploads (target, gain); (iii) the server pairs proposals into swaps and
    moves (`_select_changes`), applies the best `limit` of them, and takes the next release: if J
    from the new pooled sums is lower the step stands, else it is undone (the old release is kept)
    and `limit` halves. It stops when no device proposes, a single change is refused, or after
    `max_passes` releases beyond the first. ε (`epsilon`, total): each release gets ε/(max_passes+1),
    so the total spent never exceeds ε whenever it stops.

    `rows[i]` is device i's private counts: it is read by the oracle and by device i's own
    proposal, never by the server's steps.
    """
    rows = np.asarray(rows, dtype=np.float64)
    t = np.log(np.asarray(times, dtype=np.float64))
    n = len(rows)
    lo, hi = size_bounds(n, num_groups, size_slack)
    if lo < 2:
        raise ValueError(f"pooled grouping needs groups of at least 2 devices; {n} devices in {num_groups} groups "
                         f"with size_slack {size_slack} allow groups of {lo}")
    per_release = None if epsilon is None else epsilon / (max_passes + 1)
    oracle = SecureSum(rows, seed, per_release, masked)
    var = float(t.var()) if n else 0.0
    norm = lam / var if var > 0 else 0.0
    groups = random_groups(n, num_groups, seed)

    def server_view(gs: list[list[int]], pooled: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        p = label_dist(np.maximum(pooled, 0.0).sum(axis=0))
        s1 = np.array([t[g].sum() for g in gs])
        s2 = np.array([(t[g] ** 2).sum() for g in gs])
        m = np.array([len(g) for g in gs])
        return float(_group_cost(pooled, p, s1, s2, m, norm).sum()), p, s1, s2, m

    pooled = oracle.pooled(groups)
    J, p, s1, s2, m = server_view(groups, pooled)
    trace, limit = [J], n
    while oracle.releases <= max_passes:
        of = np.empty(n, dtype=np.int64)
        for k, g in enumerate(groups):
            of[g] = k
        props = {}
        for i in range(n):  # on each device: its own counts against the broadcast
            b, gain = device_proposal(rows[i], float(t[i]), int(of[i]), pooled, p, s1, s2, m, norm)
            if gain < -_TOL:
                props[i] = (b, gain)
        changes = _select_changes(props, of, m, lo, hi)[:limit]
        if not changes:
            break
        new_of = of.copy()
        for _, devs in changes:
            if len(devs) == 1:
                new_of[devs[0]] = props[devs[0]][0]
            else:
                i, j = devs
                new_of[i], new_of[j] = of[j], of[i]
        new_groups = [sorted(np.flatnonzero(new_of == k).tolist()) for k in range(num_groups)]
        new_pooled = oracle.pooled(new_groups)
        view = server_view(new_groups, new_pooled)
        if view[0] < J - _TOL:
            groups, pooled, (J, p, s1, s2, m) = new_groups, new_pooled, view
            trace.append(J)
        elif limit == 1:
            break
        else:
            limit = max(1, min(limit, len(changes)) // 2)
    spent = None if per_release is None else oracle.releases * per_release
    return PooledGrouping([sorted(int(i) for i in g) for g in groups], oracle.releases, spent, trace)


# -- 3. label-free sketches ------------------------------------------------------------------------

def random_projection(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """s = x·R with R ~ N(0, 1/dim)^{h×dim} seeded (every device draws the same R from the shared
    seed): distances between mean embeddings are kept up to a small distortion (Johnson–
    Lindenstrauss), and no coordinate of the embedding is sent as is."""
    x = np.asarray(x, dtype=np.float64)
    r = np.random.default_rng([seed, 7013]).normal(0.0, 1.0 / np.sqrt(dim), size=(x.shape[1], dim))
    return x @ r


def sketch_statistic(sketches: np.ndarray, sizes: np.ndarray | list[int]) -> PooledStatistic:
    """Rows [n_i·s_i, n_i] (their sum over a group gives its pooled mean sketch μ_k = Σn_i s_i / Σn_i),
    scored by D_k = ‖μ_k − μ‖² / mean_i ‖s_i − μ‖² with μ the fleet's pooled mean."""
    s = np.asarray(sketches, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    rows = np.concatenate([s * n[:, None], n[:, None]], axis=1)
    mu = rows[:, :-1].sum(axis=0) / n.sum()
    scale = float(np.mean(((s - mu) ** 2).sum(axis=1)))
    scale = scale if scale > 0 else 1.0

    def divergence(pooled: np.ndarray) -> np.ndarray:
        tot = pooled[..., -1:]
        mean = np.divide(pooled[..., :-1], tot, out=np.zeros_like(pooled[..., :-1]), where=tot > 0)
        return ((mean - mu) ** 2).sum(axis=-1) / scale

    return PooledStatistic(rows, n, divergence)

