import warnings

import numpy as np
import pytest

from hierfedlora.partition import label_histograms, partition, skew


@pytest.fixture(scope="module")
def labels4() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4, size=4000)


def _disjoint(parts: list[np.ndarray]) -> bool:
    allp = np.concatenate(parts)
    return len(allp) == len(np.unique(allp))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "kind,kw",
    [("iid", {}), ("dirichlet", {"alpha": 0.5, "min_partition_size": 5}),
     ("pathological", {"classes_per_device": 2})],
)
def test_disjoint_covering_sorted_and_seeded(labels4, kind, kw):
    parts = partition(labels4, 20, kind, seed=3, **kw)
    assert len(parts) == 20
    assert _disjoint(parts)
    # with num_devices >= C every class is drawn by some device, so all three cover
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels4)))
    assert all(np.array_equal(p, np.sort(p)) and p.dtype == np.int64 for p in parts)
    assert _same(parts, partition(labels4, 20, kind, seed=3, **kw))
    assert not _same(parts, partition(labels4, 20, kind, seed=4, **kw))


def test_iid_shards_are_near_equal_and_shuffled(labels4):
    parts = partition(labels4, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts[0].max() > len(labels4) // 2  # not a contiguous block of the input


def test_pathological_classes_per_device(labels4):
    for k in (1, 2, 3):
        hists = label_histograms(labels4, partition(labels4, 12, "pathological", classes_per_device=k), 4)
        assert ((hists > 0).sum(axis=1) == k).all()


def test_pathological_with_fewer_devices_than_classes_drops_undrawn_classes(labels4):
    # device i first gets class i mod C; with 2 devices x 1 class, classes 2 and 3 are held by none
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = partition(labels4, 2, "pathological", classes_per_device=1)
    assert _disjoint(parts)
    held = set(np.unique(labels4[np.concatenate(parts)]).tolist())
    assert held == {0, 1}
    assert len(np.concatenate(parts)) == int(np.isin(labels4, [0, 1]).sum())


def test_skew_rises_as_alpha_falls(labels4):
    s = [skew(label_histograms(labels4, partition(labels4, 80, "dirichlet", alpha=a,
                                                  min_partition_size=0, seed=1), 4))
         for a in (100.0, 1.0, 0.1)]
    assert s[0] < s[1] < s[2]
    assert s[0] < 0.05 and s[2] > 0.5


def test_skew_hand_values():
    assert skew(np.array([[5, 5], [10, 10]])) == pytest.approx(0.0)
    # global p = (1/2, 1/2); device 0 all class 0: KL = log 2; device 1 all class 1: log 2
    assert skew(np.array([[4, 0], [0, 4]])) == pytest.approx(np.log(2))
    # empty devices are ignored
    assert skew(np.array([[4, 0], [0, 4], [0, 0]])) == pytest.approx(np.log(2))


def test_label_histograms_counts():
    y = np.array([0, 1, 1, 2, 2, 2])
    h = label_histograms(y, [np.array([0, 1]), np.array([2, 3, 4, 5])], 3)
    assert h.tolist() == [[1, 1, 0], [0, 1, 3]]


def test_failing_dirichlet_gives_clear_error():
    y = np.random.default_rng(0).integers(0, 2, size=2000)
    with pytest.raises(ValueError) as e:
        partition(y, 80, "dirichlet", alpha=0.05, min_partition_size=10)
    msg = str(e.value)
    for word in ("alpha=0.05", "min_partition_size=10", "num_devices=80", "Raise alpha"):
        assert word in msg


@pytest.mark.parametrize(
    "kw,word",
    [({"kind": "zipf"}, "kind"), ({"num_devices": 0}, "num_devices"),
     ({"num_devices": 5000}, "num_devices"), ({"alpha": 0.0}, "alpha"),
     ({"alpha": float("nan")}, "alpha"), ({"min_partition_size": 500}, "min_partition_size"),
     ({"kind": "pathological", "classes_per_device": 5}, "classes_per_device")],
)
def test_bad_arguments(labels4, kw, word):
    args = {"num_devices": 10, **kw}
    with pytest.raises(ValueError, match=word):
        partition(labels4, **args)


def test_dirichlet_device_equal_shares_cover_and_skew():
    """Per-device Dirichlet works where flwr's per-class split fails (80 devices, binary, alpha 0.1)."""
    labels = np.array([0] * 5000 + [1] * 7000)
    skews = []
    for a in (100.0, 1.0, 0.1):
        parts = partition(labels, 80, "dirichlet_device", a, seed=3)
        allp = np.concatenate(parts)
        assert len(allp) == len(labels) == len(np.unique(allp))
        assert {len(p) for p in parts} == {150}
        skews.append(skew(label_histograms(labels, parts, 2)))
    assert skews[0] < skews[1] < skews[2]
    again = partition(labels, 80, "dirichlet_device", 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, partition(labels, 80, "dirichlet_device", 0.1, seed=3)))
