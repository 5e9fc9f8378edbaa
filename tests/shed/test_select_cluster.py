"""k-means proxies and the QOCS / QWCS selection strategies."""
from __future__ import annotations

import numpy as np
import pytest

from mira.errors import MiraError
from mira.shed.cluster import Clustering, kmeans
from mira.shed.select import SELECTORS, select, softmax_weights


def blobs(sizes=(5, 8, 3, 10), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.eye(len(sizes), 6) * 10
    return np.concatenate([centres[i] + rng.normal(scale=0.1, size=(n, 6)) for i, n in enumerate(sizes)])


def manual(members: list[list[int]]) -> Clustering:
    n = sum(len(m) for m in members)
    labels = np.zeros(n, dtype=np.int64)
    for c, m in enumerate(members):
        labels[m] = c
    return Clustering(labels=labels, centroids=np.zeros((len(members), 2)),
                      members=[np.array(m) for m in members], distances=np.zeros(n))


def test_kmeans_finds_blobs_and_proxy_is_nearest_the_centroid():
    x = blobs()
    cl = kmeans(x, 4, seed=0)
    assert sorted(cl.sizes.tolist()) == [3, 5, 8, 10]
    for c, m in enumerate(cl.members):
        d = np.linalg.norm(x[m] - cl.centroids[c], axis=1)
        assert cl.proxies[c] == m[np.argmin(d)]
        assert np.all(np.diff(d) >= 0)  # members sorted nearest first
        assert len(set(cl.labels[m])) == 1


def test_kmeans_on_duplicates_drops_empty_clusters():
    x = np.repeat(np.eye(3), 4, axis=0)  # 12 points, 3 distinct
    cl = kmeans(x, 6, seed=0)
    assert cl.k == 3 and cl.sizes.sum() == 12 and np.all(cl.sizes > 0)
    assert set(cl.labels.tolist()) == {0, 1, 2}


def test_kmeans_errors():
    with pytest.raises(MiraError, match="more clusters"):
        kmeans(np.zeros((3, 2)), 4)
    with pytest.raises(MiraError, match="empty"):
        kmeans(np.zeros((0, 2)), 1)


def test_registry():
    assert {"qocs", "qwcs"} <= set(SELECTORS)


def test_qocs_takes_whole_clusters_by_value_and_trims_the_last():
    cl = manual([[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]])
    values = np.array([0.5, 2.0, 1.0, -1.0])
    assert select("qocs", cl, values, 2) == [3, 4]
    assert select("qocs", cl, values, 4) == [3, 4, 5, 6]  # cluster 2 trimmed, nearest members first
    assert select("qocs", cl, values, 10) == [3, 4, 5, 6, 7, 8, 0, 1, 2, 9]
    # ties broken by cluster id
    assert select("qocs", cl, np.zeros(4), 4) == [0, 1, 2, 3]


def test_qwcs_exact_count_no_repeats_and_deterministic():
    cl = manual([list(range(0, 10)), list(range(10, 30)), list(range(30, 33))])
    values = np.array([1.0, 0.0, -1.0])
    a = select("qwcs", cl, values, 20, seed=1)
    assert len(a) == 20 == len(set(a))
    assert a == select("qwcs", cl, values, 20, seed=1)
    assert a != select("qwcs", cl, values, 20, seed=2)
    assert sorted(select("qwcs", cl, values, 33, seed=0)) == list(range(33))


def test_qwcs_beta_controls_the_preference():
    cl = manual([list(range(0, 50)), list(range(50, 100))])
    values = np.array([1.0, 0.0])
    greedy = select("qwcs", cl, values, 50, seed=0, beta=100.0)
    assert sorted(greedy) == list(range(50))  # the better cluster is exhausted first
    uniform = select("qwcs", cl, values, 50, seed=0, beta=0.0)
    assert 10 < sum(i < 50 for i in uniform) < 40
    np.testing.assert_allclose(softmax_weights(np.array([1000.0, 0.0]), 1.0), [1.0, 0.0])


def test_selector_rejects_impossible_counts():
    cl = manual([[0, 1], [2]])
    with pytest.raises(ValueError):
        select("qocs", cl, np.zeros(2), 4)
