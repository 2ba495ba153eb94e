"""Retrieval mAP and recall@k equal a direct NumPy computation, chunked or not, with and
without leave-one-out, and the API and CLI run end to end on a tiny backbone.

Tolerance: recall@k are counts (exact); a query's AP sums up to N float32 precisions, so it
carries up to ~N * 6e-8 relative error: 1e-3 (percent) for N <= 150.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dinov2_jax import weights
from dinov2_jax.eval import retrieval
from dinov2_jax.models import vit
from tiny_params import random_params


def numpy_retrieval(database, database_labels, queries, query_labels, ks, leave_one_out):
    """Per query: sort the database by cosine similarity, then AP and recall@k by definition."""
    database = database / np.linalg.norm(database, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    aps, recalls = [], []
    for q, (query, label) in enumerate(zip(queries, query_labels)):
        rows = [i for i in range(len(database)) if not (leave_one_out and i == q)]
        sims = database[rows] @ query
        ranked = np.asarray(rows)[np.argsort(-sims, kind="stable")]
        relevant = database_labels[ranked] == label
        if not relevant.any():
            continue
        ranks = np.flatnonzero(relevant) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        recalls.append([relevant[:k].any() for k in ks])
    results = {"retrieval/mAP": 100.0 * np.mean(aps)}
    for k, value in zip(ks, np.mean(recalls, axis=0)):
        results[f"retrieval/recall@{k}"] = 100.0 * value
    results["retrieval/queries"] = float(len(aps))
    return results


def _data(n, num_classes, dim=12):
    labels = np.random.randint(0, num_classes, n)
    centers = np.random.randn(num_classes, dim)
    return (centers[labels] + 1.5 * np.random.randn(n, dim)).astype(np.float32), labels


@pytest.mark.parametrize("chunk_size", [7, 256])
def test_equals_numpy_with_separate_queries(chunk_size):
    database, database_labels = _data(150, 9)
    queries, query_labels = _data(40, 12)  # Labels 9..11 have no relevant item: not scored.
    ks = (1, 5, 20)
    ours = retrieval.retrieval_metrics(database, database_labels, queries, query_labels, ks=ks,
                                       chunk_size=chunk_size)
    expected = numpy_retrieval(database, database_labels, queries, query_labels, ks, False)
    assert ours == pytest.approx(expected, abs=1e-3)
    assert ours["retrieval/queries"] == np.isin(query_labels, database_labels).sum()
    assert 0 < ours["retrieval/mAP"] < 100


def test_equals_numpy_leave_one_out():
    database, labels = _data(120, 6)
    ours = retrieval.retrieval_metrics(database, labels, ks=(1, 3), chunk_size=50)
    expected = numpy_retrieval(database, labels, database, labels, (1, 3), True)
    assert ours == pytest.approx(expected, abs=1e-3)
    # A perfectly clustered set retrieves perfectly.
    clean = np.eye(6, dtype=np.float32)[labels] + 1e-3 * np.random.randn(120, 6).astype(np.float32)
    perfect = retrieval.retrieval_metrics(clean, labels, ks=(1, 3))
    assert perfect["retrieval/mAP"] == pytest.approx(100.0)
    assert perfect["retrieval/recall@1"] == 100.0


def test_bad_inputs_are_named():
    database, labels = _data(30, 3)
    with pytest.raises(ValueError, match="no label"):
        retrieval.retrieval_metrics(database, np.where(labels == 0, -1, labels))
    with pytest.raises(ValueError, match="ranked database size"):
        retrieval.retrieval_metrics(database, labels, ks=(30,))


def test_retrieval_cli(tmp_path):
    model = vit.DinoVisionTransformer(embed_dim=32, depth=1, num_heads=2, patch_size=14,
                                      img_size=28, layerscale=1.0)
    params = random_params(model)
    weights.save(str(tmp_path / "weights"), model, params)
    output = tmp_path / "retrieval.json"
    cli = subprocess.run(
        [sys.executable, "-m", "dinov2_jax.eval.retrieval", "--weights", str(tmp_path / "weights"),
         "--database", "demo:val:num_images=24:image_size=32", "--size", "28",
         "--batch_size", "8", "--ks", "1,5", "--output", str(output)],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert cli.returncode == 0, cli.stderr
    results = json.loads(output.read_text())["results"]
    assert set(results) == {"retrieval/mAP", "retrieval/recall@1", "retrieval/recall@5",
                            "retrieval/queries"}
    assert results["retrieval/recall@1"] <= results["retrieval/recall@5"]
