"""Curation speed: exact k-NN queries/s and k-means seconds per iteration, dinov2_jax vs faiss-cpu.

Both run in one process on the same random data held in memory: N unit vectors in D
dimensions drawn around 1,000 Gaussian centres. k-NN: Q queries, their `knn_k` nearest rows by
cosine similarity (dinov2_jax `curate.search.knn` on every device, streaming budget-sized
chunks; faiss `IndexFlatIP.search`). k-means: `iterations` Lloyd iterations with k clusters
from the same random rows (dinov2_jax `curate.kmeans.Lloyd`; faiss `Kmeans`, subsampling off,
so both use all N points); the objective (sum of squared distances after the last update) is
printed as a sanity check. speed-up = faiss time / dinov2_jax time. dinov2_jax's programs are
compiled on one chunk before timing. faiss runs on this machine's CPU cores whatever the JAX
device is.

  python benchmarks/curation.py            # N=1,000,000, D=384, k=10,000, 1,000 queries
  python benchmarks/curation.py --num_rows=200000 --iterations=2
  python benchmarks/curation.py --smoke    # tiny sizes, for tests
"""
import os
import sys
import time

import faiss
import jax
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dinov2_jax import cli  # noqa: E402
from dinov2_jax.curate import embeddings as emb  # noqa: E402
from dinov2_jax.curate import kmeans, search  # noqa: E402
from text_table import table  # noqa: E402

SMOKE = {"num_rows": 2000, "dim": 32, "clusters": 16, "queries": 100, "knn_k": 5,
         "iterations": 2}


def define(fv):
    flags.DEFINE_integer("num_rows", 1_000_000, "database rows N", flag_values=fv)
    flags.DEFINE_integer("dim", 384, "embedding dimension D", flag_values=fv)
    flags.DEFINE_integer("clusters", 10_000, "k-means clusters k", flag_values=fv)
    flags.DEFINE_integer("queries", 1000, "k-NN queries", flag_values=fv)
    flags.DEFINE_integer("knn_k", 10, "neighbours per query", flag_values=fv)
    flags.DEFINE_integer("iterations", 2, "k-means iterations timed", flag_values=fv)
    flags.DEFINE_float("memory_budget_mb", emb.DEFAULT_MEMORY_BUDGET_MB,
                       "dinov2_jax's host memory budget", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)
    flags.DEFINE_bool("smoke", False, f"tiny sizes {SMOKE}: a CPU smoke run", flag_values=fv)


def make_data(num_rows, dim, seed):
    """(N, D) float32 unit vectors around 1,000 random centres, generated in pieces."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    data = np.empty((num_rows, dim), np.float32)
    for start in range(0, num_rows, 65536):
        stop = min(start + 65536, num_rows)
        block = centres[rng.integers(0, len(centres), stop - start)]
        block += 0.5 * rng.normal(size=block.shape).astype(np.float32)
        data[start:stop] = emb.l2_normalize(block)
    return data


def objective(data, centroids, chunk=65536):
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(centroids)
    return float(sum(index.search(data[i:i + chunk], 1)[0].sum()
                     for i in range(0, len(data), chunk)))


def time_knn(data, queries, k, budget, mesh):
    database = emb.Embeddings.from_array(data, "database")
    block, chunk = search.plan(len(queries), len(data), data.shape[1], k, budget, mesh.size)
    search.knn(queries, database.subset(np.arange(min(chunk, len(data))), "warm-up"), k,
               memory_budget_mb=budget, mesh=mesh, progress=False)  # Compiles the same shapes.
    start = time.perf_counter()
    jax_scores, jax_rows = search.knn(queries, database, k, memory_budget_mb=budget, mesh=mesh,
                                      progress=False)
    jax_seconds = time.perf_counter() - start
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    start = time.perf_counter()
    _, faiss_rows = index.search(emb.l2_normalize(queries), k)
    faiss_seconds = time.perf_counter() - start
    agreement = float((jax_rows == faiss_rows).mean())
    return jax_seconds, faiss_seconds, agreement


def time_kmeans(data, k, iterations, budget, mesh, seed):
    rng = np.random.default_rng(seed)
    init = data[np.sort(rng.choice(len(data), k, replace=False))]
    rows = emb.Embeddings.from_array(data, "data")
    lloyd = kmeans.Lloyd(rows, k, budget, mesh)
    kmeans.Lloyd(rows.subset(np.arange(min(lloyd.chunk, len(data))), "warm-up"), k, budget,
                 mesh).run(init, 1)  # Compiles the step for the same chunk shape.
    start = time.perf_counter()
    jax_centroids = lloyd.run(init, iterations)
    jax_seconds = (time.perf_counter() - start) / iterations
    faiss_kmeans = faiss.Kmeans(data.shape[1], k, niter=iterations, seed=seed,
                                max_points_per_centroid=len(data), min_points_per_centroid=1)
    start = time.perf_counter()
    faiss_kmeans.train(data)
    faiss_seconds = (time.perf_counter() - start) / iterations
    return (jax_seconds, faiss_seconds, objective(data, jax_centroids),
            objective(data, faiss_kmeans.centroids))


def main(argv):
    f = cli.parse(argv, define, __doc__.splitlines()[0])
    sizes = {name: f[name].value for name in SMOKE}
    if f.smoke:
        sizes.update(SMOKE)
    mesh = search.row_mesh()
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"dinov2_jax on {device}; faiss-cpu {faiss.__version__} on {os.cpu_count()} CPU "
          f"threads; N={sizes['num_rows']:,} D={sizes['dim']} k={sizes['clusters']:,} "
          f"queries={sizes['queries']:,} knn_k={sizes['knn_k']}", flush=True)
    data = make_data(sizes["num_rows"], sizes["dim"], f.seed)
    queries = make_data(sizes["queries"], sizes["dim"], f.seed + 1)
    knn_jax, knn_faiss, agreement = time_knn(data, queries, sizes["knn_k"], f.memory_budget_mb,
                                             mesh)
    km_jax, km_faiss, obj_jax, obj_faiss = time_kmeans(
        data, sizes["clusters"], sizes["iterations"], f.memory_budget_mb, mesh, f.seed)
    rows = [
        {"task": f"k-NN, {sizes['queries']} queries x {sizes['num_rows']} rows, "
                 f"top-{sizes['knn_k']}", "unit": "queries/s",
         "dinov2_jax": f"{sizes['queries'] / knn_jax:.1f}",
         "faiss-cpu": f"{sizes['queries'] / knn_faiss:.1f}",
         "speed-up": f"{knn_faiss / knn_jax:.2f}x", "check": f"same ids {agreement:.4f}"},
        {"task": f"k-means, k={sizes['clusters']}, {sizes['iterations']} iterations",
         "unit": "s/iteration", "dinov2_jax": f"{km_jax:.3f}", "faiss-cpu": f"{km_faiss:.3f}",
         "speed-up": f"{km_faiss / km_jax:.2f}x",
         "check": f"objective {obj_jax:.6g} vs {obj_faiss:.6g}"},
    ]
    print(table(rows))


if __name__ == "__main__":
    cli.run(main)
