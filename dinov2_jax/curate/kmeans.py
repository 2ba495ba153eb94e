"""Hierarchical k-means with resampling (Vo et al. 2024, arXiv 2405.15613), sharded over devices.

Level 1 clusters the embeddings, level l the centroids of level l-1, into the `levels[l-1]`
clusters named (finest first). Each level runs Lloyd's algorithm with L2 distance from a
k-means++ (or random) start, then `resampling` steps: a fresh k-means (new start) on a
resample made of the `resampling_size` points nearest each centroid (or random members), then
every point reassigned to its centroids. Every cluster weighs the same in a resample, so
resampling moves centroids off dense modes and spreads them evenly over concepts.

One Lloyd pass streams the rows in chunks that fit the memory budget. Each chunk is split over
the devices of a 1-D mesh; inside `jax.shard_map` every device assigns its rows (matmul +
argmin) and sums them per cluster (`segment_sum`), and `psum` adds the devices' sums. The
host adds the chunks' sums in float64. So 1 and 8 devices give the same result up to float32
summation order.

Output, written as each level completes (a rerun skips complete levels: resume after a kill):
  kmeans.json                 the settings; a rerun with other settings is refused
  rows.npy                    (n_1,) int64 embedding row of each level-1 point, when a subset
                              of the embeddings (`indices`, e.g. what dedup kept) is clustered
  level{l}_centroids.npy      (k_l, D) float32
  level{l}_assignments.npy    (n_l,) int64 cluster of each input point of level l
  level{l}_distances.npy      (n_l,) float32 squared distance to that centroid
  level{l}.json               k, objective, cluster sizes, seconds (written last: the marker)
"""
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from etils import epath
from jax.sharding import PartitionSpec as P

from dinov2_jax.configs import ConfigError
from dinov2_jax.curate import embeddings as emb
from dinov2_jax.curate import search

INITS = ("kmeans++", "random")
RESAMPLING_STRATEGIES = ("closest", "random")
DEFAULT_ITERATIONS = 20
DEFAULT_RESAMPLING_SIZE = 10
# k-means++ runs on a uniform sample of at most this many points per centroid: each of its k
# sequential steps reads the whole sample.
INIT_POINTS_PER_CENTROID = 32
SETTINGS = "kmeans.json"
ROWS = "rows.npy"


def argmin_block(num_clusters: int) -> int:
    """Columns per block of `argmin_rows`: about sqrt(k)."""
    return max(1, math.isqrt(num_clusters))


def argmin_rows(values, block: int):
    """(argmin, min) of each row, the first index on ties, as jnp.argmin, for a column count
    that is a multiple of `block`. In two stages: the minima of blocks of columns, then the
    argmin inside the winning block; XLA's CPU argmin over long rows (a variadic reduce) is
    several times slower than this."""
    rows, columns = values.shape
    blocks = values.reshape(rows, columns // block, block)
    block_min = jnp.min(blocks, axis=2)
    winner = jnp.argmin(block_min, axis=1)
    inside = jnp.take_along_axis(blocks, winner[:, None, None], axis=1)[:, 0]
    return winner * block + jnp.argmin(inside, axis=1), jnp.min(block_min, axis=1)


@functools.lru_cache(maxsize=32)
def _assign_step(mesh, num_clusters: int):
    """jit(chunk, centroids, valid_rows) -> per-cluster sums and counts, objective, labels and
    squared distances of the chunk's rows."""

    def per_device(rows, centroids, valid_rows):
        shard_rows = rows.shape[0]
        row = jax.lax.axis_index(search.AXIS) * shard_rows + jnp.arange(shard_rows)
        weight = (row < valid_rows).astype(jnp.float32)
        # Centroids padded to whole argmin blocks; the padding's |c|^2 = inf never wins.
        block = argmin_block(num_clusters)
        extra = -num_clusters % block
        squared = jnp.pad(jnp.sum(centroids * centroids, axis=1), (0, extra),
                          constant_values=jnp.inf)
        padded = jnp.pad(centroids, ((0, extra), (0, 0)))
        dots = jnp.matmul(rows, padded.T, precision=jax.lax.Precision.HIGHEST)
        labels, nearest = argmin_rows(squared[None] - 2 * dots, block)  # |c|^2 - 2 x.c
        sq_distances = jnp.maximum(jnp.sum(rows * rows, axis=1) + nearest, 0.0)
        sums = jax.ops.segment_sum(rows * weight[:, None], labels, num_clusters)
        counts = jax.ops.segment_sum(weight, labels, num_clusters)
        objective = jnp.sum(sq_distances * weight)
        psum = functools.partial(jax.lax.psum, axis_name=search.AXIS)
        return psum(sums), psum(counts), psum(objective), labels.astype(jnp.int32), sq_distances

    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(search.AXIS), P(), P()),
                                 out_specs=(P(), P(), P(), P(search.AXIS), P(search.AXIS))))


def chunk_rows(num_clusters: int, dim: int, memory_budget_mb: float, devices: int) -> int:
    """Rows per chunk: the chunk in its host copies, its (rows, k) distance matrix, its labels,
    besides the centroids and their float64 sums."""
    fixed = num_clusters * (dim + 1) * (emb.BYTES_PER_FLOAT * 3 + 8 * 2)
    per_row = (emb.CHUNK_COPIES * dim + 2 * num_clusters + 4) * emb.BYTES_PER_FLOAT
    return emb.rows_within(memory_budget_mb, per_row, fixed, devices,
                           f" for k-means with k={num_clusters}, D={dim}")


class Lloyd:
    """Lloyd passes over one set of rows, streamed in budget-sized chunks over the mesh."""

    def __init__(self, rows: emb.Embeddings, num_clusters: int, memory_budget_mb: float, mesh):
        self.rows, self.mesh = rows, mesh
        self.chunk = min(chunk_rows(num_clusters, rows.dim, memory_budget_mb, mesh.size),
                         -(-len(rows) // mesh.size) * mesh.size)
        self.step = _assign_step(mesh, num_clusters)

    def assign(self, centroids: np.ndarray, labels: bool = False):
        """(float64 sums (k, D), counts (k,), objective, labels (N,) int64 | None,
        squared distances (N,) float32 | None) of the rows under `centroids`."""
        centroids_device = search.replicate(self.mesh, np.asarray(centroids, np.float32))
        sums = np.zeros(centroids.shape, np.float64)
        counts = np.zeros(len(centroids), np.float64)
        objective = 0.0
        all_labels = np.empty(len(self.rows), np.int64) if labels else None
        distances = np.empty(len(self.rows), np.float32) if labels else None
        pending = None

        def collect(start, count, result):
            nonlocal objective
            chunk_sums, chunk_counts, chunk_objective, chunk_labels, chunk_distances = result
            sums[...] += np.asarray(chunk_sums, np.float64)
            counts[...] += np.asarray(chunk_counts, np.float64)
            objective += float(chunk_objective)
            if labels:
                all_labels[start:start + count] = np.asarray(chunk_labels)[:count]
                distances[start:start + count] = np.asarray(chunk_distances)[:count]

        for start, block in self.rows.chunks(self.chunk):
            result = self.step(search.place_rows(self.mesh, block, self.chunk), centroids_device,
                               np.int32(len(block)))  # Dispatched: the next read overlaps it.
            if pending is not None:
                collect(*pending)
            pending = (start, len(block), result)
        collect(*pending)
        return sums, counts, objective, all_labels, distances

    def run(self, centroids: np.ndarray, iterations: int, bar=None) -> np.ndarray:
        """`iterations` Lloyd updates from `centroids`; an empty cluster keeps its centroid."""
        centroids = np.asarray(centroids, np.float32)
        for _ in range(iterations):
            sums, counts, objective, _, _ = self.assign(centroids)
            filled = counts > 0
            centroids = centroids.copy()
            centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
            if bar is not None:
                bar.set_postfix(objective=f"{objective:.6g}")
                bar.update(1)
        return centroids


@functools.partial(jax.jit, static_argnums=1)
def _kmeans_plus_plus(points, num_clusters, key):
    """k-means++ (Arthur and Vassilvitskii 2007): each next centroid is a point drawn with
    probability proportional to its squared distance to the nearest centroid so far."""
    key, first_key = jax.random.split(key)
    first = points[jax.random.randint(first_key, (), 0, points.shape[0])]
    centroids = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(first)
    nearest = jnp.sum((points - first) ** 2, axis=1)

    def add(i, carry):
        centroids, nearest, key = carry
        key, draw = jax.random.split(key)
        # Points already chosen have distance 0 and log(0) = -inf: never drawn again.
        chosen = points[jax.random.categorical(draw, jnp.log(nearest))]
        nearest = jnp.minimum(nearest, jnp.sum((points - chosen) ** 2, axis=1))
        return centroids.at[i].set(chosen), nearest, key

    return jax.lax.fori_loop(1, num_clusters, add, (centroids, nearest, key))[0]


def initial_centroids(rows: emb.Embeddings, num_clusters: int, init: str, seed: int,
                      memory_budget_mb: float) -> np.ndarray:
    """k-means++ on a uniform sample (see INIT_POINTS_PER_CENTROID), or random distinct rows."""
    rng = np.random.default_rng(seed)
    gather_chunk = emb.rows_within(memory_budget_mb, rows.dim * emb.BYTES_PER_FLOAT * 2)
    if init == "random":
        return rows.gather(np.sort(rng.choice(len(rows), num_clusters, replace=False)),
                           gather_chunk)
    budget_rows = emb.rows_within(memory_budget_mb, rows.dim * emb.BYTES_PER_FLOAT * 4,
                                  what=" for the k-means++ sample")
    sample_size = min(len(rows), INIT_POINTS_PER_CENTROID * num_clusters, budget_rows)
    if sample_size < num_clusters:
        raise ConfigError(f"--memory_budget_mb={memory_budget_mb} holds {sample_size} points for "
                          f"the k-means++ sample, fewer than k={num_clusters}")
    sample = rows.gather(np.sort(rng.choice(len(rows), sample_size, replace=False)), gather_chunk)
    return np.asarray(_kmeans_plus_plus(jnp.asarray(sample), num_clusters,
                                        jax.random.key(seed)))


def resample(labels: np.ndarray, distances: np.ndarray, per_cluster: int, strategy: str,
             rng: np.random.Generator) -> np.ndarray:
    """Sorted rows: the `per_cluster` members nearest each centroid, or random members."""
    key = distances if strategy == "closest" else rng.random(len(labels))
    order = np.lexsort((key, labels))
    sorted_labels = labels[order]
    group_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - group_start
    return np.sort(order[rank < per_cluster])


def _per_level(values, levels, name):
    values = [int(v) for v in values]
    if len(values) == 1:
        values = values * len(levels)
    if len(values) != len(levels):
        raise ConfigError(f"--{name} has {len(values)} values for {len(levels)} levels")
    if min(values) < 0:
        raise ConfigError(f"--{name} must be >= 0, got {values}")
    return values


def check_settings(levels, iterations, resampling, resampling_size, resampling_strategy, init):
    """Validated (levels, resampling steps per level, resample size per level)."""
    levels = [int(k) for k in levels]
    if not levels or min(levels) < 1:
        raise ConfigError(f"--levels must be positive cluster counts, got {levels}")
    if any(coarse >= fine for fine, coarse in zip(levels, levels[1:])):
        raise ConfigError(f"--levels must decrease from the first (finest) level, got {levels}")
    if iterations < 1:
        raise ConfigError(f"--iterations must be >= 1, got {iterations}")
    if init not in INITS:
        raise ConfigError(f"--init {init!r} is not one of {INITS}")
    if resampling_strategy not in RESAMPLING_STRATEGIES:
        raise ConfigError(f"--resampling_strategy {resampling_strategy!r} is not one of "
                          f"{RESAMPLING_STRATEGIES}")
    sizes = _per_level(resampling_size, levels, "resampling_size")
    if min(sizes) < 1:
        raise ConfigError(f"--resampling_size must be >= 1, got {sizes}")
    return levels, _per_level(resampling, levels, "resampling"), sizes


def _claim(output: epath.Path, settings: dict) -> None:
    """Writes the settings, or checks that an earlier run in `output` used the same ones."""
    path = output / SETTINGS
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in settings.keys() | previous.keys()
                         if settings.get(k) != previous.get(k))
        if changed:
            there = {k: previous.get(k) for k in changed}
            now = {k: settings.get(k) for k in changed}
            raise ConfigError(f"{output} holds a k-means run with other settings ({there} there, "
                              f"{now} now); use another --output")
        return
    emb.save_json(path, settings)


def clustered_rows(output) -> np.ndarray | None:
    """Embedding row of each level-1 point, when a subset was clustered (else None)."""
    path = epath.Path(output) / ROWS
    return emb.load_array(path) if path.exists() else None


def level_paths(output, level: int) -> dict[str, epath.Path]:
    output = epath.Path(output)
    return {name: output / f"level{level}_{name}.npy"
            for name in ("centroids", "assignments", "distances")} | {
        "done": output / f"level{level}.json"}


def kmeans_level(rows: emb.Embeddings, num_clusters: int, iterations: int, *, resampling=0,
                 resampling_size=DEFAULT_RESAMPLING_SIZE, resampling_strategy="closest",
                 init="kmeans++", seed=0, memory_budget_mb=emb.DEFAULT_MEMORY_BUDGET_MB,
                 mesh=None, progress=True, desc="k-means"):
    """One level: (centroids, labels, squared distances, objective) of `rows`."""
    if num_clusters > len(rows):
        raise ConfigError(f"{desc}: k={num_clusters} clusters for only {len(rows)} points")
    mesh = search.row_mesh() if mesh is None else mesh
    rng = np.random.default_rng(seed)
    lloyd = Lloyd(rows, num_clusters, memory_budget_mb, mesh)
    centroids = initial_centroids(rows, num_clusters, init, seed, memory_budget_mb)
    bar = tqdm.tqdm(total=iterations * (1 + resampling), unit="it", desc=desc,
                    disable=not progress)
    centroids = lloyd.run(centroids, iterations, bar)
    _, _, objective, labels, distances = lloyd.assign(centroids, labels=True)
    for step in range(resampling):
        chosen = resample(labels, distances, resampling_size, resampling_strategy, rng)
        resample_mb = len(chosen) * rows.dim * emb.BYTES_PER_FLOAT / 2**20
        if resample_mb > memory_budget_mb / 2:
            raise ConfigError(f"{desc}: a resample of {len(chosen)} points ({resample_mb:.0f} MB) "
                              f"does not fit half of --memory_budget_mb={memory_budget_mb}; "
                              f"lower --resampling_size")
        if len(chosen) < num_clusters:
            raise ConfigError(f"{desc}: a resample of {resampling_size} points per cluster has "
                              f"{len(chosen)} points, fewer than k (empty clusters); raise "
                              f"--resampling_size")
        subset = emb.Embeddings.from_array(rows.gather(chosen, lloyd.chunk),
                                           f"{desc} resample {step + 1}")
        start = initial_centroids(subset, num_clusters, init, seed + step + 1, memory_budget_mb)
        centroids = Lloyd(subset, num_clusters, memory_budget_mb, mesh).run(start, iterations, bar)
        _, _, objective, labels, distances = lloyd.assign(centroids, labels=True)
    bar.close()
    return centroids, labels, distances, objective


def hierarchical_kmeans(embeddings: emb.Embeddings, levels, iterations: int, output, *,
                        indices: np.ndarray | None = None, indices_name: str = "",
                        resampling=(0,), resampling_size=(DEFAULT_RESAMPLING_SIZE,),
                        resampling_strategy="closest", init="kmeans++", seed=0,
                        memory_budget_mb=emb.DEFAULT_MEMORY_BUDGET_MB, mesh=None,
                        progress=True, log=print) -> list[dict]:
    """Runs (or resumes) every level into `output`; returns each level's summary. With
    `indices` (rows of `embeddings`, named `indices_name`), only those rows are clustered."""
    levels, resampling, resampling_size = check_settings(
        levels, iterations, resampling, resampling_size, resampling_strategy, init)
    output = epath.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _claim(output, {"embeddings": embeddings.name, "num_rows": len(embeddings),
                    "dim": embeddings.dim, "indices": indices_name,
                    "num_points": len(embeddings) if indices is None else len(indices),
                    "levels": levels, "iterations": iterations,
                    "resampling": resampling, "resampling_size": resampling_size,
                    "resampling_strategy": resampling_strategy, "init": init, "seed": seed})
    rows, summaries = embeddings, []
    if indices is not None:
        emb.save_array(output / ROWS, indices)
        rows = embeddings.subset(indices, f"{embeddings.name}[{indices_name}]")
    for level, num_clusters in enumerate(levels, 1):
        paths = level_paths(output, level)
        if paths["done"].exists():
            summary = json.loads(paths["done"].read_text())
            log(f"level {level}: complete in {output}, skipped")
        else:
            start = time.perf_counter()
            centroids, labels, distances, objective = kmeans_level(
                rows, num_clusters, iterations, resampling=resampling[level - 1],
                resampling_size=resampling_size[level - 1],
                resampling_strategy=resampling_strategy, init=init, seed=seed + level,
                memory_budget_mb=memory_budget_mb, mesh=mesh, progress=progress,
                desc=f"level {level} (k={num_clusters})")
            emb.save_array(paths["centroids"], centroids)
            emb.save_array(paths["assignments"], labels)
            emb.save_array(paths["distances"], distances)
            sizes = np.bincount(labels, minlength=num_clusters)
            summary = {"level": level, "k": num_clusters, "points": len(rows),
                       "objective": objective, "empty_clusters": int((sizes == 0).sum()),
                       "largest_cluster": int(sizes.max()), "seconds": time.perf_counter() - start}
            emb.save_json(paths["done"], summary)
            log(f"level {level}: k={num_clusters} on {len(rows)} points, objective "
                f"{objective:.6g}, largest cluster {summary['largest_cluster']}, "
                f"{summary['empty_clusters']} empty, {summary['seconds']:.1f} s")
        summaries.append(summary)
        rows = emb.Embeddings.from_array(emb.load_array(paths["centroids"]),
                                         f"level {level} centroids")
    return summaries
