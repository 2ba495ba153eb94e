"""Balanced hierarchical sampling from a hierarchical k-means (Vo et al. 2024, arXiv 2405.15613).

Top-down: the target size is shared among the top level's clusters with even shares capped by
their sizes, the largest share c with sum_i min(c, size_i) <= target (water filling); the
remainder goes one each to randomly chosen clusters larger than c. Each cluster's share is
then shared the same way among its sub-clusters, down to level 1, whose clusters give their
share as their points nearest the centroid (`closest`) or random members (`random`). A
long-tailed distribution of concepts becomes close to uniform: small clusters are taken
whole and the big ones give what the small ones could not.
"""
import numpy as np
from etils import epath

from dinov2_jax.configs import ConfigError
from dinov2_jax.curate import embeddings as emb
from dinov2_jax.curate import kmeans

STRATEGIES = ("random", "closest")


def water_fill(sizes: np.ndarray, quota: int, rng: np.random.Generator) -> np.ndarray:
    """Shares of `quota` among groups of `sizes`: capped even shares, remainder at random."""
    sizes = np.asarray(sizes, np.int64)
    if quota >= sizes.sum():
        return sizes.copy()
    low, high = 0, int(sizes.max())  # f(c) = sum min(c, size) is nondecreasing in c.
    while low < high:
        middle = (low + high + 1) // 2
        if np.minimum(sizes, middle).sum() <= quota:
            low = middle
        else:
            high = middle - 1
    shares = np.minimum(sizes, low)
    remainder = quota - int(shares.sum())
    if remainder:  # Fewer than the groups larger than `low`, else low + 1 would fit.
        larger = np.flatnonzero(sizes > low)
        shares[rng.choice(larger, remainder, replace=False)] += 1
    return shares


def _groups(parents: np.ndarray):
    """(order, group starts) that list the children of each parent together."""
    order = np.argsort(parents, kind="stable")
    starts = np.searchsorted(parents[order], np.arange(parents.max() + 2))
    return order, starts


def balanced_sample(assignments: list[np.ndarray], size: int, *, strategy: str = "closest",
                    distances: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Sorted rows of the level-1 points: `assignments[l]` maps the points of level l+1 (the
    embeddings for l = 0, else level l's clusters) to their clusters; `distances` are the
    points' squared distances to their level-1 centroid (for `closest`)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r} is not one of {STRATEGIES}")
    if strategy == "closest" and distances is None:
        raise ConfigError("--strategy closest needs the level-1 distances")
    num_points = len(assignments[0])
    if not 1 <= size <= num_points:
        raise ConfigError(f"--size must be in [1, {num_points}] (the clustered points), got {size}")
    rng = np.random.default_rng(seed)
    # points[l][j]: how many embeddings lie under cluster j of level l + 1.
    points = [np.bincount(assignments[0])]
    for parents in assignments[1:]:
        points.append(np.bincount(parents, weights=points[-1][:len(parents)]).astype(np.int64))
    quota = water_fill(points[-1], size, rng)
    for level in range(len(assignments) - 1, 0, -1):
        parents = assignments[level]
        child_points = np.zeros(len(parents), np.int64)
        child_points[:len(points[level - 1])] = points[level - 1]
        order, starts = _groups(parents)
        child_quota = np.zeros(len(parents), np.int64)
        for parent in np.flatnonzero(quota):
            children = order[starts[parent]:starts[parent + 1]]
            child_quota[children] = water_fill(child_points[children], int(quota[parent]), rng)
        quota = child_quota
    order, starts = _groups(assignments[0])
    chosen = []
    for cluster in np.flatnonzero(quota):
        members = order[starts[cluster]:starts[cluster + 1]]
        take = int(quota[cluster])
        if take >= len(members):
            chosen.append(members)
        elif strategy == "closest":
            chosen.append(members[np.argsort(distances[members], kind="stable")[:take]])
        else:
            chosen.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def load_clusters(clusters) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """(assignments of every level, finest first; level-1 distances; embedding row of each
    level-1 point or None when all rows were clustered) of a `kmeans` output."""
    clusters = epath.Path(clusters)
    assignments, level = [], 1
    while kmeans.level_paths(clusters, level)["done"].exists():
        assignments.append(emb.load_array(kmeans.level_paths(clusters, level)["assignments"]))
        level += 1
    if not assignments:
        raise ConfigError(f"--clusters {clusters} holds no complete k-means level "
                          f"(level1.json); run `kmeans` first")
    for level, (points, parents) in enumerate(zip(assignments, assignments[1:]), 2):
        if len(parents) <= points.max():
            raise ConfigError(f"{clusters}: level {level} assigns {len(parents)} clusters, but "
                              f"level {level - 1} uses {points.max() + 1}")
    return (assignments, emb.load_array(kmeans.level_paths(clusters, 1)["distances"]),
            kmeans.clustered_rows(clusters))


def sample_clusters(clusters, size: int, *, strategy: str = "closest", seed: int = 0) -> np.ndarray:
    """Sorted embedding rows: a balanced sample of `size` from a `kmeans` output folder."""
    assignments, distances, rows = load_clusters(clusters)
    chosen = balanced_sample(assignments, size, strategy=strategy, distances=distances, seed=seed)
    return chosen if rows is None else np.sort(rows[chosen])
