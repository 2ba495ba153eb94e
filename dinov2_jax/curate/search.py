"""Exact k-nearest-neighbour search: blocked matmul plus top-k over device-sharded chunks.

The database is streamed from disk in chunks that fit the memory budget. Each chunk is split
over the devices of a 1-D mesh (`rows`); inside `jax.shard_map` every device scores its rows
against a block of queries, keeps its own top k, and the devices' candidates are gathered and
merged into a running top k that stays on the device for the whole pass. Nothing is
approximate: the result equals a brute force up to float32 rounding of the dot products.
Ties keep the lower row first, as a stable sort would. Metrics: `cosine` (rows and queries
L2-normalised, score = dot product) and `l2` (squared Euclidean distance, smallest first).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dinov2_jax.configs import ConfigError
from dinov2_jax.curate import embeddings as emb

AXIS = "rows"
METRICS = ("cosine", "l2")
MAX_QUERY_BLOCK = 2048


def row_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices (or `devices`) whose one axis splits rows."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def place_rows(mesh, rows: np.ndarray, padded_rows: int) -> jax.Array:
    """Host rows zero-padded to `padded_rows` and split over the mesh; each host passes the
    same chunk and only its own devices' slices are transferred."""
    padded = np.zeros((padded_rows, *rows.shape[1:]), rows.dtype)
    padded[:len(rows)] = rows
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.make_array_from_callback(padded.shape, sharding, lambda index: padded[index])


def replicate(mesh, value) -> jax.Array:
    return jax.device_put(value, NamedSharding(mesh, P()))


def _prepare(rows: np.ndarray, metric: str) -> np.ndarray:
    return emb.l2_normalize(rows) if metric == "cosine" else rows


@functools.lru_cache(maxsize=32)
def _search_step(mesh, k: int, local_k: int, metric: str):
    """jit(state, queries, chunk, valid_rows, chunk_number) -> state merged with the chunk."""

    def per_device(queries, rows, valid_rows):
        shard_rows = rows.shape[0]
        row_in_chunk = jax.lax.axis_index(AXIS) * shard_rows + jnp.arange(shard_rows)
        scores = jnp.matmul(queries, rows.T, precision=jax.lax.Precision.HIGHEST)
        if metric == "l2":  # 2 q.x - |x|^2 = |q|^2 - |q - x|^2: larger is nearer.
            scores = 2 * scores - jnp.sum(rows * rows, axis=1)[None]
        scores = jnp.where(row_in_chunk[None] < valid_rows, scores, -jnp.inf)
        top_scores, top = jax.lax.top_k(scores, local_k)
        return top_scores, row_in_chunk[top].astype(jnp.int32)

    # Each device's candidates side by side, device order (so ascending rows) along axis 1.
    candidates = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                               out_specs=(P(None, AXIS), P(None, AXIS)))

    def step(state, queries, rows, valid_rows, chunk_number):
        best_scores, best_chunks, best_rows = state
        new_scores, new_rows = candidates(queries, rows, valid_rows)
        new_chunks = jnp.full_like(new_rows, chunk_number)
        scores = jnp.concatenate([best_scores, new_scores], axis=1)  # Earlier chunks first: ties
        top_scores, top = jax.lax.top_k(scores, k)                   # keep the lower row.
        take = functools.partial(jnp.take_along_axis, indices=top, axis=1)
        return (top_scores, take(jnp.concatenate([best_chunks, new_chunks], axis=1)),
                take(jnp.concatenate([best_rows, new_rows], axis=1)))

    return jax.jit(step, donate_argnums=0)


def plan(num_queries: int, num_rows: int, dim: int, k: int, memory_budget_mb: float,
         devices: int) -> tuple[int, int]:
    """(query block, database chunk rows) whose host arrays fit the budget: the query block,
    the chunk, its score matrix (block x chunk) and the top-k state."""
    block = min(num_queries, MAX_QUERY_BLOCK)
    while True:
        fixed = block * (dim + 3 * k * (devices + 1)) * emb.BYTES_PER_FLOAT
        try:
            rows = emb.rows_within(memory_budget_mb,
                                   (emb.CHUNK_COPIES * dim + block) * emb.BYTES_PER_FLOAT, fixed,
                                   devices, " for this search")
            break
        except ConfigError:
            if block == 1:
                raise
            block = max(1, block // 2)
    return block, min(rows, math.ceil(num_rows / devices) * devices)


def knn(queries, database: emb.Embeddings, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest database rows of every query: (scores (Q, k) float32, rows (Q, k) int64).

    `queries` is an Embeddings or an (Q, D) array. Scores are cosine similarities (largest
    first) or squared L2 distances (smallest first). When the database has fewer than `k`
    rows, the missing neighbours have row -1 and score -inf (cosine) or inf (l2). Keyword
    arguments are those of `knn_blocks`.
    """
    blocks = list(knn_blocks(queries, database, k, **kwargs))
    return (np.concatenate([scores for _, scores, _ in blocks]),
            np.concatenate([rows for _, _, rows in blocks]))


def knn_blocks(queries, database: emb.Embeddings, k: int, *, metric: str = "cosine",
               memory_budget_mb: float = emb.DEFAULT_MEMORY_BUDGET_MB, mesh=None,
               progress: bool = True, desc: str = "k-NN"):
    """`knn` one query block at a time: yields (first query, scores, rows), so that a caller
    can keep what it needs of each block (dedup keeps the edges above its threshold)."""
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r} is not one of {METRICS}")
    if isinstance(queries, np.ndarray):
        queries = emb.Embeddings.from_array(queries, "queries")
    if queries.dim != database.dim:
        raise ConfigError(f"queries {queries.name} have dimension {queries.dim}, but the "
                          f"database {database.name} has {database.dim}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    mesh = row_mesh() if mesh is None else mesh
    devices = mesh.size
    block, chunk = plan(len(queries), len(database), database.dim, k, memory_budget_mb, devices)
    local_k = min(k, chunk // devices)
    step = _search_step(mesh, k, local_k, metric)
    passes = math.ceil(len(queries) / block) * math.ceil(len(database) / chunk)
    bar = tqdm.tqdm(total=passes * chunk, unit="row", unit_scale=True, desc=desc,
                    disable=not progress)
    for q_start, q_rows in queries.chunks(block):
        q = _prepare(q_rows, metric)
        state = (replicate(mesh, np.full((block, k), -np.inf, np.float32)),
                 replicate(mesh, np.zeros((block, k), np.int32)),
                 replicate(mesh, np.zeros((block, k), np.int32)))
        q_device = replicate(mesh, np.pad(q, ((0, block - len(q)), (0, 0))))
        for number, (start, rows) in enumerate(database.chunks(chunk)):
            state = step(state, q_device, place_rows(mesh, _prepare(rows, metric), chunk),
                         np.int32(len(rows)), np.int32(number))
            bar.update(chunk)
        scores, chunks, rows_in_chunk = (np.asarray(x)[:len(q)] for x in state)
        found = np.isfinite(scores)
        ids = np.where(found, chunks.astype(np.int64) * chunk + rows_in_chunk, -1)
        if metric == "l2":
            scores = np.where(found, np.maximum(np.sum(q * q, axis=1)[:, None] - scores, 0), np.inf)
        yield q_start, scores, ids
    bar.close()
