"""Retrieval curation (the DINOv2 paper, arXiv 2304.07193, section 3): pool images near seeds.

For a large seed set, each seed (query) embedding selects its `k` nearest pool images by
cosine similarity (exact, `search.knn`). For a small one, each seed selects `per_cluster`
random members of its k-means cluster: the level-1 cluster whose centroid is nearest to the
seed in L2, the metric the clustering used. The selection is the union, as sorted rows.
"""
import numpy as np
from etils import epath

from dinov2_jax.configs import ConfigError
from dinov2_jax.curate import embeddings as emb
from dinov2_jax.curate import kmeans, search


def retrieve(pool: emb.Embeddings, queries: emb.Embeddings, k: int, *,
             memory_budget_mb: float = emb.DEFAULT_MEMORY_BUDGET_MB, mesh=None,
             progress: bool = True) -> np.ndarray:
    """Sorted rows of the pool: the union of every query's `k` nearest neighbours."""
    if not 1 <= k <= len(pool):
        raise ConfigError(f"--k must be in [1, {len(pool)}] (the pool's size), got {k}")
    _, rows = search.knn(queries, pool, k, metric="cosine", memory_budget_mb=memory_budget_mb,
                         mesh=mesh, progress=progress, desc="retrieve")
    return np.unique(rows[rows >= 0])


def retrieve_per_cluster(queries: emb.Embeddings, clusters, per_cluster: int, *, seed: int = 0,
                         memory_budget_mb: float = emb.DEFAULT_MEMORY_BUDGET_MB, mesh=None,
                         progress: bool = True) -> np.ndarray:
    """Sorted embedding rows: `per_cluster` random members of each query's nearest level-1
    cluster (all of them when it has fewer), drawn per query."""
    if per_cluster < 1:
        raise ConfigError(f"--per_cluster must be >= 1, got {per_cluster}")
    paths = kmeans.level_paths(epath.Path(clusters), 1)
    if not paths["done"].exists():
        raise ConfigError(f"--clusters {clusters} holds no complete level 1; run `kmeans` first")
    centroids = emb.Embeddings.from_array(emb.load_array(paths["centroids"]), "level 1 centroids")
    labels = emb.load_array(paths["assignments"])
    _, nearest = search.knn(queries, centroids, 1, metric="l2", memory_budget_mb=memory_budget_mb,
                            mesh=mesh, progress=progress, desc="nearest cluster")
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(len(centroids) + 1))
    rng = np.random.default_rng(seed)
    chosen = []
    for cluster in nearest[:, 0]:
        members = order[starts[cluster]:starts[cluster + 1]]
        chosen.append(members if len(members) <= per_cluster
                      else rng.choice(members, per_cluster, replace=False))
    chosen = np.unique(np.concatenate(chosen))
    rows = kmeans.clustered_rows(clusters)
    return (chosen if rows is None else np.sort(rows[chosen])).astype(np.int64)
