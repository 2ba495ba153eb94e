"""Near-duplicate removal by cosine similarity, within a pool and against evaluation sets.

Within the pool: every image is linked to those of its `k` exact nearest neighbours whose
cosine similarity is at least `threshold`, and one image (the lowest row) is kept per
connected component of that graph: the DINOv2 paper's copy-detection dedup (arXiv 2304.07193,
section 3 and appendix A). Against evaluation sets ("relative" dedup): a pool image whose
nearest neighbour in any of them reaches `against_threshold` is dropped; a component keeps
its lowest surviving row. Both searches are the exact blocked top-k of `search.knn`.
"""
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from dinov2_jax.configs import ConfigError
from dinov2_jax.curate import embeddings as emb
from dinov2_jax.curate import search

DEFAULT_K = 64


def duplicate_edges(first_row: int, scores: np.ndarray,
                    neighbours: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) rows of the k-NN edges with score >= threshold, self-loops left out,
    of a block of query rows starting at `first_row`."""
    source = np.repeat(np.arange(first_row, first_row + len(neighbours)), neighbours.shape[1])
    target, score = neighbours.ravel(), scores.ravel()
    edge = (score >= threshold) & (target >= 0) & (target != source)
    return source[edge], target[edge]


def components(num_rows: int, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Component label of every row of the undirected graph of these edges."""
    graph = scipy.sparse.coo_matrix((np.ones(len(source), np.int8), (source, target)),
                                    shape=(num_rows, num_rows))
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1]


def first_per_component(labels: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Sorted rows: the lowest alive row of every component."""
    rows = np.flatnonzero(alive)
    _, first = np.unique(labels[rows], return_index=True)
    return np.sort(rows[first])


def dedup(pool: emb.Embeddings, threshold: float, against=(), *, against_threshold=None,
          k: int = DEFAULT_K, memory_budget_mb: float = emb.DEFAULT_MEMORY_BUDGET_MB,
          mesh=None, progress: bool = True) -> tuple[np.ndarray, dict]:
    """(rows of `pool` to keep, sorted int64; counts of what was dropped and why)."""
    against_threshold = threshold if against_threshold is None else against_threshold
    for name, value in (("threshold", threshold), ("against_threshold", against_threshold)):
        if not -1.0 <= value <= 1.0:
            raise ConfigError(f"--{name} is a cosine similarity in [-1, 1], got {value}")
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    kwargs = dict(metric="cosine", memory_budget_mb=memory_budget_mb, mesh=mesh,
                  progress=progress)
    edges = [duplicate_edges(start, scores, neighbours, threshold)  # Only edges stay in memory.
             for start, scores, neighbours in search.knn_blocks(
                 pool, pool, min(k + 1, len(pool)), desc="pool k-NN", **kwargs)]  # +1: itself
    labels = components(len(pool), np.concatenate([s for s, _ in edges]),
                        np.concatenate([t for _, t in edges]))
    alive = np.ones(len(pool), bool)
    stats = {"pool": len(pool), "groups": int(labels.max()) + 1}
    for other in against:
        if other.dim != pool.dim:
            raise ConfigError(f"--against {other.name} has dimension {other.dim}, but the pool "
                              f"{pool.name} has {pool.dim}")
        nearest, _ = search.knn(pool, other, 1, desc=f"against {other.name}", **kwargs)
        hit = nearest[:, 0] >= against_threshold
        stats[f"near {other.name}"] = int(hit.sum())
        alive &= ~hit
    keep = first_per_component(labels, alive)
    stats.update(dropped_against=int((~alive).sum()),
                 dropped_within=int(alive.sum()) - len(keep), kept=len(keep))
    return keep.astype(np.int64), stats
