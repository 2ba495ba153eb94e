"""k-NN evaluation: equals a direct NumPy transcription of the reference protocol
(`dinov2/eval/knn.py`; docs/reference.md, Evaluation), chunking changes nothing, and the API
and CLI run end to end on a tiny backbone.

The comparison is exact (accuracies are counts): features are random floats, so similarities
and class scores have no near-ties that float32 vs float64 could flip. Exact ties (classes
with score 0 when fewer than 5 classes are among the neighbours) break toward the lower class
in both, which is the documented rule.
"""
import json
import os
import pickle
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dinov2_jax import weights as weights_lib
from dinov2_jax.data import augment, sources
from dinov2_jax.eval import extract, knn
from dinov2_jax.models import vit
from tiny_params import random_params

KS = (10, 20, 100, 200)


def numpy_knn(train, train_labels, query, query_labels, ks, temperature, num_classes):
    """The reference protocol written directly: full similarity matrix, no chunks, float64."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    sims = query.astype(np.float64) @ train.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :max(ks)]
    top_sims = np.take_along_axis(sims, order, axis=1)
    weights = np.exp(top_sims / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    onehot = np.eye(num_classes)[train_labels[order]]  # (Q, max_k, C)
    results = {}
    for k in ks:
        scores = (onehot[:, :k] * weights[:, :k, None]).sum(axis=1)
        ranked = np.argsort(-scores, axis=1, kind="stable")
        top1 = int(np.sum(ranked[:, 0] == query_labels))
        top5 = int(np.sum((ranked[:, :5] == query_labels[:, None]).any(1)))
        results[f"knn/top1_k{k}"] = 100.0 * top1 / len(query)
        results[f"knn/top5_k{k}"] = 100.0 * top5 / len(query)
    results["knn/top1"] = max(results[f"knn/top1_k{k}"] for k in ks)
    return results


def _clustered(n, centers, spread):
    labels = np.random.randint(0, len(centers), n)
    features = centers[labels] + spread * np.random.randn(n, centers.shape[1])
    return features.astype(np.float32), labels.astype(np.int32)


# Train and queries share the class centres; measured top-1 ranges (200-300 draws of each
# setting): 42-77%, 72-98% and 39-68%, far from the 0 and 100 that the last assert rules out.
@pytest.mark.parametrize("num_classes,spread", [(12, 2.0), (3, 2.0), (40, 1.5)])
def test_equals_numpy_reference(num_classes, spread):
    centers = np.random.randn(num_classes, 24)
    train, train_labels = _clustered(450, centers, spread)
    query, query_labels = _clustered(130, centers, spread)
    train *= np.random.uniform(0.5, 3.0, (len(train), 1)).astype(np.float32)  # Not unit norm.
    temperature = np.random.uniform(0.03, 0.2)
    ours = knn.knn_classify(train, train_labels, query, query_labels, ks=KS,
                            temperature=temperature, num_classes=num_classes)
    expected = numpy_knn(train, train_labels, query, query_labels, KS, temperature,
                         num_classes)
    assert ours == expected
    assert 0 < ours["knn/top1"] < 100  # Neither trivial nor degenerate.


def test_chunked_equals_unchunked():
    centers = np.random.randn(10, 16)
    train, train_labels = _clustered(333, centers, 2.5)
    query, query_labels = _clustered(101, centers, 2.5)
    whole = knn.knn_classify(train, train_labels, query, query_labels, ks=KS,
                             chunk_size=512, train_chunk_size=10_000)
    for chunk_size, train_chunk_size in [(7, 13), (32, 200), (101, 1)]:
        chunked = knn.knn_classify(train, train_labels, query, query_labels, ks=KS,
                                   chunk_size=chunk_size, train_chunk_size=train_chunk_size)
        assert chunked == whole, (chunk_size, train_chunk_size)


def test_neighbors_match_full_sort():
    database = np.random.randn(97, 8).astype(np.float32)
    queries = np.random.randn(5, 8).astype(np.float32)
    # 10 database chunks, the last one padded; 2 query chunks, the last one padded.
    sims, index = knn.nearest_neighbors(database, queries, 30, chunk_size=3,
                                        database_chunk_size=10)
    unit = database / np.linalg.norm(database, axis=1, keepdims=True)
    full = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    np.testing.assert_array_equal(index, np.argsort(-full, axis=1)[:, :30])
    np.testing.assert_allclose(sims, -np.sort(-full, axis=1)[:, :30], atol=1e-6)


def test_bad_inputs_are_named():
    train, labels = _clustered(50, np.random.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match="no label"):
        knn.knn_classify(train, np.where(labels == 0, -1, labels), train, labels, ks=(5,))
    with pytest.raises(ValueError, match="train set size"):
        knn.knn_classify(train, labels, train, labels, ks=(10, 200))
    with pytest.raises(ValueError, match="disagree"):
        knn.knn_classify(train, labels[:-1], train, labels, ks=(5,))


def _tiny_weights(directory):
    model = vit.DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=14,
                                      img_size=28, layerscale=1.0)
    params = random_params(model)
    weights_lib.save(str(directory), model, params)
    return model, params


def test_knn_eval_and_cli(tmp_path):
    model, params = _tiny_weights(tmp_path / "weights")
    train_source = "demo:train:num_images=48:image_size=32"
    val_source = "demo:val:num_images=20:image_size=32"
    results = knn.knn_eval(model, params, train_source, val_source, image_size=28,
                           resize_size=32, batch_size=16, ks=(5, 10), progress=False)
    assert set(results) == {"knn/top1_k5", "knn/top5_k5", "knn/top1_k10", "knn/top5_k10",
                            "knn/top1"}
    # The extracted features are the backbone's cls tokens of the eval-transformed images.
    def by_hand(spec):
        source = sources.open_source(spec)
        images = np.stack([augment.normalize(augment.eval_transform(source[i]["image"], 32, 28))
                           for i in range(len(source))])
        out = jax.jit(model.apply)({"params": params}, images)
        return np.asarray(out["x_norm_clstoken"]), [source[i]["label"] for i in range(len(source))]

    extracted = {}
    for spec in (train_source, val_source):
        extracted[spec] = extract.extract_source(model, params, spec, image_size=28,
                                                 resize_size=32, batch_size=16, progress=False)
        cls, labels = by_hand(spec)
        np.testing.assert_allclose(extracted[spec]["cls"], cls, atol=1e-5)  # fp32, batched.
        np.testing.assert_array_equal(extracted[spec]["label"], labels)
        np.testing.assert_array_equal(extracted[spec]["index"], np.arange(len(labels)))
    assert results == knn.knn_classify(
        extracted[train_source]["cls"], extracted[train_source]["label"],
        extracted[val_source]["cls"], extracted[val_source]["label"], ks=(5, 10))
    output = tmp_path / "results.json"
    cli = subprocess.run(
        [sys.executable, "-m", "dinov2_jax.eval.knn", "--weights", str(tmp_path / "weights"),
         "--train", train_source, "--val", val_source, "--size", "28", "--resize_size", "32",
         "--batch_size", "16", "--ks", "5,10", "--output", str(output)],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert cli.returncode == 0, cli.stderr
    assert "knn/top1_k10" in cli.stdout and "k-NN train" in cli.stderr  # Progress shown.
    written = json.loads(output.read_text())
    assert written["results"] == pytest.approx(results, abs=1e-9)
    assert written["train"] == train_source


_SHARDED_EXTRACTION = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from dinov2_jax import weights
from dinov2_jax.eval import extract
model, params = weights.load(sys.argv[1])
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "fsdp"))
def shard(x):  # FSDP-like: the leading axis over 'fsdp' where it divides.
    spec = PartitionSpec("fsdp") if x.ndim and x.shape[0] % 2 == 0 else PartitionSpec()
    return jax.device_put(x, NamedSharding(mesh, spec))
out = extract.extract_source(model, jax.tree.map(shard, params), sys.argv[2], image_size=28,
                             resize_size=32, batch_size=6, progress=False)
np.savez(sys.argv[3], **out)
"""


def test_extraction_on_sharded_params_and_four_devices(tmp_path):
    """The in-training path: params sharded on the train mesh, batches over its 4 devices."""
    model, params = _tiny_weights(tmp_path / "weights")
    source = "demo:val:num_images=23:image_size=32"  # 23: the last batches are padded.
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    run = subprocess.run([sys.executable, "-c", _SHARDED_EXTRACTION, str(tmp_path / "weights"),
                          source, str(tmp_path / "out.npz")], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr
    sharded = np.load(tmp_path / "out.npz")
    single = extract.extract_source(model, params, source, image_size=28, resize_size=32,
                                    batch_size=6, progress=False)
    np.testing.assert_allclose(sharded["cls"], single["cls"], atol=1e-5)
    np.testing.assert_array_equal(sharded["index"], np.arange(23))
    np.testing.assert_array_equal(sharded["label"], single["label"])


_TWO_HOST_EXTRACTION = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
import pickle
import numpy as np
from dinov2_jax.eval import extract
from dinov2_jax.models import vit
with open(sys.argv[3], "rb") as f:
    params = pickle.load(f)
model = vit.DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=14,
                                  img_size=28, layerscale=1.0)
out = extract.extract_source(model, params, sys.argv[4], image_size=28, resize_size=32,
                             batch_size=8, progress=False)
np.savez(sys.argv[5], **out)
"""


def test_extraction_on_two_hosts(tmp_path):
    """Each host reads its half of the source; both end with every image's features. With 9
    images and 4 per host and step, host 1 runs out first and feeds an empty batch."""
    model, params = _tiny_weights(tmp_path / "weights")
    with open(tmp_path / "params.pkl", "wb") as f:
        pickle.dump(jax.tree.map(np.asarray, params), f)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = "demo:val:num_images=9:image_size=32"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    hosts = [subprocess.Popen(
        [sys.executable, "-c", _TWO_HOST_EXTRACTION, str(port), str(i),
         str(tmp_path / "params.pkl"), source, str(tmp_path / f"host{i}.npz")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    for host in hosts:
        _, stderr = host.communicate(timeout=300)
        assert host.returncode == 0, stderr
    single = extract.extract_source(model, params, source, image_size=28, resize_size=32,
                                    batch_size=8, progress=False)
    for i in range(2):
        out = np.load(tmp_path / f"host{i}.npz")
        np.testing.assert_array_equal(out["index"], np.arange(9))
        np.testing.assert_array_equal(out["label"], single["label"])
        np.testing.assert_allclose(out["cls"], single["cls"], atol=1e-5)
