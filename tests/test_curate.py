"""dinov2_jax.curate: exact k-NN, dedup, hierarchical k-means, balanced sampling, retrieval,
bad input, bounded memory and 8 fake devices against 1, on fresh random data."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import faiss
import jax
import numpy as np
import pytest

from dinov2_jax.configs import ConfigError
from dinov2_jax.curate import dedup, kmeans, retrieve, sample, search
from dinov2_jax.curate import embeddings as emb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# float32 dot products of unit vectors summed in different orders (blocked matmul vs numpy's
# BLAS) differ by a few ulps of 1: observed <= 3e-7.
SCORE_TOLERANCE = 1e-5


def _rng():
    return np.random.default_rng()  # Fresh data every run.


def _blobs(rng, sizes, dim, spread):
    """Points around one random centre per cluster (sizes[i] points in cluster i), labels."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.normal(size=(len(sizes), dim))
    points = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return points.astype(np.float32), labels


def _assert_same_neighbours(scores, rows, expected_scores, order, **tolerance):
    """Scores within tolerance; ids equal except where two candidates tie within it."""
    np.testing.assert_allclose(scores, np.take_along_axis(expected_scores, order, 1), **tolerance)
    differ = rows != order
    if differ.any():  # A swap is only allowed between near-equal scores.
        got = np.take_along_axis(expected_scores, rows, 1)
        np.testing.assert_allclose(got[differ], scores[differ], **tolerance)
    assert differ.mean() < 0.01


@pytest.mark.parametrize("metric", search.METRICS)
def test_knn_equals_numpy_brute_force(metric):
    rng = _rng()
    database = rng.normal(size=(3001, 48)).astype(np.float32)
    queries = rng.normal(size=(2500, 48)).astype(np.float32)  # > MAX_QUERY_BLOCK
    # 2 MB: query blocks and database chunks of a few hundred rows, so blocks, chunks and the
    # last partial ones are all exercised.
    block, chunk = search.plan(len(queries), len(database), 48, 10, 2, 1)
    assert block < len(queries) and chunk < len(database)
    scores, rows = search.knn(queries, emb.Embeddings.from_array(database, "db"), 10,
                              metric=metric, memory_budget_mb=2, progress=False)
    queries64, database64 = queries.astype(np.float64), database.astype(np.float64)
    if metric == "cosine":
        expected = emb.l2_normalize(queries) @ emb.l2_normalize(database).T
        order = np.argsort(-expected, axis=1, kind="stable")[:, :10]
        tolerance = {"atol": SCORE_TOLERANCE}
    else:
        expected = ((queries64 ** 2).sum(1)[:, None] + (database64 ** 2).sum(1)[None]
                    - 2 * queries64 @ database64.T)
        order = np.argsort(expected, axis=1, kind="stable")[:, :10]
        # |q|^2 - (2 q.x - |x|^2) in float32 for distances ~100: observed relative <= 4e-7.
        tolerance = {"rtol": 1e-5}
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    _assert_same_neighbours(scores, rows, expected, order, **tolerance)


def test_knn_with_fewer_rows_than_k_pads_with_minus_one():
    database = _rng().normal(size=(3, 8)).astype(np.float32)
    scores, rows = search.knn(database, emb.Embeddings.from_array(database, "db"), 5,
                              progress=False)
    assert (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert (rows[:, 0] == np.arange(3)).all()  # Each row is its own nearest neighbour.


def _planted_pool(rng, num_points=4000, num_groups=150, dim=64):
    """Random unit vectors (nearest cosine ~0.5) plus groups of an image and 1-3 near-copies
    (noise 0.01 per dimension: cosine ~0.997); the group ids of the planted rows."""
    base = emb.l2_normalize(rng.normal(size=(num_points, dim)))
    sources = rng.choice(num_points, num_groups, replace=False)
    copies, group_of_copy = [], []
    for group, source in enumerate(sources):
        for _ in range(rng.integers(1, 4)):
            copies.append(base[source] + 0.01 * rng.normal(size=dim))
            group_of_copy.append(group)
    pool = np.concatenate([base, np.asarray(copies, np.float32)])
    order = rng.permutation(len(pool))
    group = np.full(len(pool), -1)
    group[sources] = np.arange(num_groups)
    group[num_points:] = group_of_copy
    return pool[order].astype(np.float32), group[order]


def test_dedup_keeps_exactly_one_of_each_planted_group():
    rng = _rng()
    pool, group = _planted_pool(rng)
    keep, stats = dedup.dedup(emb.Embeddings.from_array(pool, "pool"), 0.95, k=8,
                              memory_budget_mb=4, progress=False)
    kept_per_group = np.bincount(group[keep][group[keep] >= 0], minlength=group.max() + 1)
    recall = (kept_per_group == 1).mean()
    assert recall >= 0.98, kept_per_group
    others = np.flatnonzero(group < 0)
    false_drops = 1 - np.isin(others, keep).mean()
    assert false_drops <= 0.005
    assert stats["kept"] == len(keep) and stats["dropped_within"] == len(pool) - len(keep)


def test_dedup_against_an_evaluation_set_drops_its_near_copies():
    rng = _rng()
    pool = emb.l2_normalize(rng.normal(size=(2000, 32)))
    copied = rng.choice(len(pool), 40, replace=False)
    evaluation = (pool[copied] + 0.01 * rng.normal(size=(40, 32))).astype(np.float32)
    keep, stats = dedup.dedup(emb.Embeddings.from_array(pool, "pool"), 0.95,
                              [emb.Embeddings.from_array(evaluation, "eval")],
                              against_threshold=0.9, progress=False)
    np.testing.assert_array_equal(np.setdiff1d(np.arange(len(pool)), keep), np.sort(copied))
    assert stats["dropped_against"] == 40


def test_kmeans_objective_within_5_percent_of_faiss():
    rng = _rng()
    points, _ = _blobs(rng, rng.integers(20, 200, size=60), 32, 0.5)
    k, iterations = 64, 10
    centroids, labels, distances, objective = kmeans.kmeans_level(
        emb.Embeddings.from_array(points, "points"), k, iterations, memory_budget_mb=4,
        progress=False)
    reference = faiss.Kmeans(32, k, niter=iterations, seed=int(rng.integers(1 << 30)))
    reference.train(points)
    faiss_objective = float(reference.index.search(points, 1)[0].sum())
    assert objective <= 1.05 * faiss_objective
    # The returned labels and distances are those of the returned centroids (float32 sums).
    exact = ((points[:, None].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    np.testing.assert_allclose(distances, exact.min(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(objective, exact.min(1).sum(), rtol=1e-5)
    assert (exact[np.arange(len(points)), labels] <= exact.min(1) + 1e-3).all()


def test_resampling_moves_centroids_from_dense_modes_to_sparse_ones():
    """One dense blob and 30 small ones, 31 clusters: plain k-means spends a dozen centroids on
    the dense blob; in a resample every cluster weighs the same, and the fresh k-means on it
    leaves the dense blob about one (observed 12-14 without, 1-2 with)."""
    rng = _rng()
    points, labels = _blobs(rng, [4000] + [20] * 30, 16, 0.3)
    rows = emb.Embeddings.from_array(points, "points")

    def centroids_on_dense_blob(resampling):
        _, assigned, _, _ = kmeans.kmeans_level(rows, 31, 10, resampling=resampling,
                                                resampling_size=3, progress=False)
        return len(np.unique(assigned[labels == 0]))

    assert centroids_on_dense_blob(3) <= centroids_on_dense_blob(0) // 2


def _entropy_ratio(labels, num_classes):
    shares = np.bincount(labels, minlength=num_classes) / len(labels)
    shares = shares[shares > 0]
    return float(-(shares * np.log(shares)).sum() / np.log(num_classes))


def test_balanced_sampling_flattens_zipf_clusters(tmp_path):
    rng = _rng()
    num_classes = 50
    weights = 1.0 / np.arange(1, num_classes + 1) ** 1.1  # Zipf: pool entropy ~0.77 log C
    sizes = np.maximum(np.round(weights / weights.sum() * 20000), 1).astype(int)
    points, labels = _blobs(rng, sizes, 32, 0.15)
    kmeans.hierarchical_kmeans(emb.Embeddings.from_array(points, "points"), [250, 50], 10,
                               tmp_path, resampling=[1, 1], resampling_size=[10, 3],
                               progress=False, log=lambda line: None)
    selected = sample.sample_clusters(tmp_path, 2000, strategy="closest")
    assert len(selected) == len(np.unique(selected)) == 2000
    random_sample = rng.choice(len(points), 2000, replace=False)
    pool, uniform = _entropy_ratio(labels, num_classes), _entropy_ratio(labels[random_sample],
                                                                        num_classes)
    assert 0.72 < pool < 0.82 and 0.72 < uniform < 0.82  # ~0.77 each
    assert _entropy_ratio(labels[selected], num_classes) >= 0.9


def test_water_fill_gives_capped_even_shares():
    rng = _rng()
    np.testing.assert_array_equal(sample.water_fill([1, 5, 10], 9, rng), [1, 4, 4])
    np.testing.assert_array_equal(sample.water_fill([3, 4], 100, rng), [3, 4])
    for _ in range(20):
        sizes = rng.integers(1, 50, size=rng.integers(1, 30))
        quota = int(rng.integers(1, sizes.sum() + 1))
        shares = sample.water_fill(sizes, quota, rng)
        assert shares.sum() == quota and (shares <= sizes).all()
        uncapped = shares[shares < sizes]
        if len(uncapped):  # Whoever is below its size got the most anyone got, or one less.
            assert shares.max() - uncapped.min() <= 1


def test_hierarchical_sampling_shares_top_level_quota_evenly():
    # Two top clusters: one over level-1 clusters of 100 and 1 points, one over 50 and 49.
    level1 = np.repeat([0, 1, 2, 3], [100, 1, 50, 49])
    level2 = np.array([0, 0, 1, 1])
    distances = _rng().random(len(level1)).astype(np.float32)
    chosen = sample.balanced_sample([level1, level2], 20, strategy="closest",
                                    distances=distances)
    per_cluster = np.bincount(level1[chosen], minlength=4)
    np.testing.assert_array_equal(per_cluster, [9, 1, 5, 5])
    members = np.flatnonzero(level1 == 0)  # `closest`: the 9 nearest of cluster 0.
    np.testing.assert_array_equal(np.sort(chosen[level1[chosen] == 0]),
                                  np.sort(members[np.argsort(distances[members])[:9]]))


def test_retrieve_and_its_cluster_variant(tmp_path):
    rng = _rng()
    pool = emb.l2_normalize(rng.normal(size=(1500, 16)))
    seeds = emb.l2_normalize(rng.normal(size=(20, 16)))
    rows = emb.Embeddings.from_array(pool, "pool")
    selected = retrieve.retrieve(rows, emb.Embeddings.from_array(seeds, "seeds"), 4,
                                 progress=False)
    expected = np.argsort(-(seeds @ pool.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(selected, np.unique(expected))
    kmeans.hierarchical_kmeans(rows, [30], 5, tmp_path, progress=False, log=lambda line: None)
    chosen = retrieve.retrieve_per_cluster(emb.Embeddings.from_array(seeds, "seeds"), tmp_path,
                                           3, progress=False)
    centroids = np.load(tmp_path / "level1_centroids.npy")
    labels = np.load(tmp_path / "level1_assignments.npy")
    seed_clusters = np.unique(((seeds[:, None] - centroids[None]) ** 2).sum(-1).argmin(1))
    assert set(labels[chosen]) == set(seed_clusters)
    assert len(chosen) <= 3 * len(seeds)


def test_kmeans_writes_levels_and_resumes_from_the_last_complete_one(tmp_path):
    points, _ = _blobs(_rng(), [300] * 8, 8, 0.3)
    rows = emb.Embeddings.from_array(points, "points")
    run = lambda: kmeans.hierarchical_kmeans(rows, [40, 8, 2], 5, tmp_path, init="random",
                                             progress=False, log=logged.append)
    logged = []
    first = run()
    assert [level["k"] for level in first] == [40, 8, 2]
    assert np.load(tmp_path / "level1_assignments.npy").shape == (2400,)
    assert np.load(tmp_path / "level2_assignments.npy").shape == (40,)
    assert np.load(tmp_path / "level3_centroids.npy").shape == (2, 8)
    level2 = np.load(tmp_path / "level2_centroids.npy")
    for level in (2, 3):  # As if killed during level 2.
        for path in kmeans.level_paths(tmp_path, level).values():
            path.unlink()
    logged.clear()
    run()
    assert logged[0] == f"level 1: complete in {tmp_path}, skipped"
    np.testing.assert_array_equal(np.load(tmp_path / "level2_centroids.npy"), level2)
    with pytest.raises(ConfigError, match="other settings.*iterations"):
        kmeans.hierarchical_kmeans(rows, [40, 8, 2], 6, tmp_path, init="random", progress=False)


@pytest.mark.parametrize("levels, message", [
    ([10, 20], "must decrease"), ([0], "positive"), ([5000], "only 2400 points")])
def test_kmeans_rejects_bad_levels(tmp_path, levels, message):
    points, _ = _blobs(_rng(), [300] * 8, 8, 0.3)
    with pytest.raises(ConfigError, match=message):
        kmeans.hierarchical_kmeans(emb.Embeddings.from_array(points, "p"), levels, 2, tmp_path,
                                   progress=False)


def test_bad_inputs_name_the_file_and_the_row(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    good = _rng().normal(size=(10, 4)).astype(np.float32)
    np.save(folder / "a.npy", good)
    np.save(folder / "b.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(ConfigError, match=r"b\.npy: rows have dimension 5, but .*a\.npy has 4"):
        emb.Embeddings.open(folder)
    nan = good.copy()
    nan[7, 2] = np.nan
    np.save(folder / "b.npy", nan)
    with pytest.raises(ConfigError, match=r"b\.npy: row 7 holds NaN"):
        list(emb.Embeddings.open(folder).chunks(4))
    zero = good.copy()
    zero[3] = 0
    np.save(folder / "b.npy", zero)
    with pytest.raises(ConfigError, match=r"b\.npy: row 3 is all zeros"):
        search.knn(good, emb.Embeddings.open(folder), 2, progress=False)
    np.save(tmp_path / "flat.npy", np.zeros(5, np.float32))
    with pytest.raises(ConfigError, match="flat.npy: embeddings must be a 2-D"):
        emb.Embeddings.open(tmp_path / "flat.npy")
    np.save(tmp_path / "keep.npy", np.array([0, 5, 20, 3]))
    with pytest.raises(ConfigError, match=r"keep\.npy: row 2 holds index 20, outside \[0, 20\)"):
        emb.load_indices(tmp_path / "keep.npy", 20)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match="junk.npy: not a readable .npy file"):
        emb.Embeddings.open(tmp_path / "junk.npy")


def test_a_folder_reads_as_one_matrix_and_subsets_read_through_it(tmp_path):
    parts = [_rng().normal(size=(n, 6)).astype(np.float32) for n in (5, 1, 9)]
    for i, part in enumerate(parts):
        np.save(tmp_path / f"part-{i}.npy", part)
    whole = np.concatenate(parts)
    rows = emb.Embeddings.open(tmp_path)
    np.testing.assert_array_equal(np.concatenate([c for _, c in rows.chunks(4)]), whole)
    picked = np.array([14, 0, 5, 5, 7])
    np.testing.assert_array_equal(rows.gather(picked, 3), whole[picked])
    np.testing.assert_array_equal(rows.subset(picked, "s").read(1, 4), whole[picked[1:4]])
    assert rows.locate(6) == (str(tmp_path / "part-2.npy"), 0)


def _python(script, timeout=240, devices=None):
    env = {**ENV, "PYTHONPATH": os.path.join(ROOT, "tests")}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _sharded_run(data, mesh=None):
    """k-NN and one k-means level with resampling, in small chunks, on `mesh`."""
    rows = emb.Embeddings.from_array(data, "data")
    scores, ids = search.knn(data[:100], rows, 7, memory_budget_mb=1, mesh=mesh, progress=False)
    centroids, labels, _, objective = kmeans.kmeans_level(
        rows, 24, 6, resampling=1, resampling_size=4, memory_budget_mb=1, mesh=mesh,
        progress=False)
    return {"scores": scores, "ids": ids, "centroids": centroids, "labels": labels,
            "objective": objective}


def test_8_fake_devices_equal_1_device(tmp_path):
    points, _ = _blobs(_rng(), [250] * 12, 16, 0.4)
    np.save(tmp_path / "data.npy", points)
    _python(f"""
        import jax, numpy as np, test_curate
        assert jax.device_count() == 8
        np.savez({str(tmp_path / 'eight.npz')!r},
                 **test_curate._sharded_run(np.load({str(tmp_path / 'data.npy')!r})))
    """, devices=8)
    eight = np.load(tmp_path / "eight.npz")
    one = _sharded_run(points, search.row_mesh(jax.devices()[:1]))
    np.testing.assert_array_equal(one["ids"], eight["ids"])
    np.testing.assert_allclose(one["scores"], eight["scores"], atol=SCORE_TOLERANCE)
    # Same assignments; centroids differ only by float32 summation order over devices.
    np.testing.assert_array_equal(one["labels"], eight["labels"])
    np.testing.assert_allclose(one["centroids"], eight["centroids"], atol=1e-5)
    np.testing.assert_allclose(one["objective"], eight["objective"], rtol=1e-5)


_BOUNDED_RUN = """
    import resource, sys
    import numpy as np
    from dinov2_jax.curate import embeddings as emb, kmeans, search
    budget, dim = 8, 64
    def write(path, rows):  # Header, then rows written in pieces: never whole in memory.
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
            for start in range(0, rows, 8192):
                f.write(rng.normal(size=(min(8192, rows - start), dim)).astype("<f4").tobytes())
    def run(path):
        rows = emb.Embeddings.open(path)
        search.knn(rows.read(0, 64), rows, 5, memory_budget_mb=budget, progress=False)
        kmeans.kmeans_level(rows, 16, 2, init="random", memory_budget_mb=budget,
                            progress=False)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    small, large = sys.argv[1] + "/small.npy", sys.argv[1] + "/large.npy"
    large_rows = 4 * budget * 2**20 // (4 * dim)  # 4x the budget
    write(small, large_rows // 8)
    write(large, large_rows)
    run(small)  # Compiles the same chunk shapes.
    before = peak()
    run(large)
    print(peak() - before, large_rows * dim * 4)
"""


def test_a_database_4x_the_memory_budget_streams_in_chunks(tmp_path):
    growth, size = map(int, _python(_BOUNDED_RUN.replace("sys.argv[1]", repr(str(tmp_path))))
                       .split())
    assert size == 4 * 8 * 2**20
    # Holding the database whole would grow the peak by its size (32 MB); chunks keep the
    # growth within the 8 MB budget.
    assert growth < 8 * 2**20, growth


def test_benchmark_smoke_prints_both_libraries(capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # As when run as a script.
    spec = importlib.util.spec_from_file_location("curation_benchmark",
                                                  os.path.join(ROOT, "benchmarks", "curation.py"))
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["curation.py", "--smoke"])
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header[:4] == ["task", "unit", "dinov2_jax", "faiss-cpu"]
    knn_line, kmeans_line = lines[2], lines[3]
    assert "queries/s" in knn_line and "same ids 1.0000" in knn_line
    assert "s/iteration" in kmeans_line and "objective" in kmeans_line
