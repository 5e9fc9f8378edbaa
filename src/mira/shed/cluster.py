"""Step 2 of SHED: k-means on the embeddings; each cluster is represented by a proxy.

The proxy of a cluster is its member nearest to the centroid (ties: the lowest index).
Clusters that come out empty (k-means on duplicated points) are dropped and the rest
renumbered, so every cluster has at least one member. Members of each cluster are kept
sorted by distance to the centroid (then by index): QOCS trims a cluster in that order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mira.errors import MiraError

MINIBATCH_ABOVE = 20_000  # records; above this, MiniBatchKMeans (k-means on 100k x 3000 is slow)


@dataclass
class Clustering:
    """The clusters of ``n`` points; indices are positions in the embedded array."""

    labels: np.ndarray  # (n,) cluster id of each point
    centroids: np.ndarray  # (k, d)
    members: list[np.ndarray]  # per cluster: point indices, nearest to the centroid first
    distances: np.ndarray  # (n,) distance of each point to its centroid

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def proxies(self) -> np.ndarray:
        """Per cluster, the index of the point nearest its centroid."""
        return np.array([m[0] for m in self.members], dtype=np.int64)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(m) for m in self.members], dtype=np.int64)


def _threads() -> int:
    return int(os.environ.get("MIRA_THREADS", "0")) or (os.cpu_count() or 1)


def kmeans(embeddings: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 3) -> Clustering:
    """Cluster ``embeddings`` (n, d) into at most ``n_clusters`` non-empty clusters (seeded)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    if n == 0:
        raise MiraError("nothing to cluster: the data set is empty", where="data")
    if not 0 < n_clusters <= n:
        raise MiraError(f"more clusters ({n_clusters}) than records ({n})", where="clusters")
    if n_clusters == 1:
        centroids = x.mean(axis=0, keepdims=True)
        labels = np.zeros(n, dtype=np.int64)
    else:
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        algo = (MiniBatchKMeans(n_clusters, random_state=seed, n_init=n_init, batch_size=4096)
                if n > MINIBATCH_ABOVE else KMeans(n_clusters, random_state=seed, n_init=n_init))
        with threadpool_limits(_threads()), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than clusters
            labels = algo.fit_predict(x).astype(np.int64)
        centroids = algo.cluster_centers_.astype(np.float32)
    used = np.unique(labels)
    remap = np.full(max(int(labels.max()) + 1, len(centroids)), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    labels = remap[labels]
    centroids = centroids[used]
    distances = np.linalg.norm(x - centroids[labels], axis=1)
    members = []
    for c in range(len(used)):
        idx = np.flatnonzero(labels == c)
        members.append(idx[np.lexsort((idx, distances[idx]))])
    return Clustering(labels=labels, centroids=centroids, members=members, distances=distances)
