"""`python -m dinov2_jax.curate`: one-line errors, kill -9 then resume (embed by shard, kmeans
by level), and the whole chain on the demo, from a demo-trained teacher to training on the
curated shards."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dinov2_jax import cli, weights
from dinov2_jax.curate import __main__ as curate
from dinov2_jax.curate import embeddings as emb
from dinov2_jax.data import sources
from dinov2_jax.models import vit
from tiny_params import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
EMBED_FLAGS = ["--images=demo:train:num_images=480", "--image_size=32", "--shard_size=32",
               "--batch_size=32", "--noprogress"]


def _curate(*argv):
    curate.main(["curate", *argv])


def _start(*argv):
    return subprocess.Popen([sys.executable, "-m", "dinov2_jax.curate", *argv], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(process, ready, timeout=180):
    """SIGKILL `process` as soon as `ready()`; False when it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    model = vit.DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                      img_size=32, layerscale=1.0)
    directory = tmp_path_factory.mktemp("weights")
    weights.save(directory, model, random_params(model))
    return directory


def test_bad_input_is_one_error_line_naming_file_and_row(tmp_path, capsys):
    rows = np.random.default_rng().normal(size=(6, 4)).astype(np.float32)
    rows[4] = np.nan
    np.save(tmp_path / "pool.npy", rows)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(curate.main, ["curate", "dedup", f"--embeddings={tmp_path / 'pool.npy'}",
                              "--threshold=0.9", f"--output={tmp_path / 'keep.npy'}",
                              "--noprogress"])
    assert exit_info.value.code == 1
    expected = f"error: {tmp_path / 'pool.npy'}: row 4 holds NaN or infinite values\n"
    assert capsys.readouterr().err == expected
    with pytest.raises(SystemExit):
        cli.run(curate.main, ["curate", "cluster"])
    assert "unknown command 'cluster'" in capsys.readouterr().err


def test_embed_resumes_from_the_last_complete_shard_after_kill_9(tiny_weights, tmp_path, capsys):
    for attempt in range(3):  # A run that ends before the kill point is tried again.
        output = tmp_path / f"killed-{attempt}"
        manifest = output / emb.MANIFEST
        process = _start("embed", f"--weights={tiny_weights}", f"--output={output}",
                         *EMBED_FLAGS)
        if _kill_when(process, lambda: manifest.exists()
                      and 0 < len(json.loads(manifest.read_text())["shards"]) < 15):
            break
    else:
        pytest.fail("every run finished before it could be killed")
    complete = len(json.loads(manifest.read_text())["shards"])
    assert complete < 15
    _curate("embed", f"--weights={tiny_weights}", f"--output={output}", *EMBED_FLAGS)
    resumed_line = f"{complete} of 15 shards complete, resuming at shard {complete}"
    assert resumed_line in capsys.readouterr().out
    _curate("embed", f"--weights={tiny_weights}", f"--output={tmp_path / 'whole'}",
            *EMBED_FLAGS)
    resumed, whole = emb.Embeddings.open(output), emb.Embeddings.open(tmp_path / "whole")
    assert len(resumed) == 480 and resumed.dim == 32
    np.testing.assert_array_equal(resumed.read(0, 480), whole.read(0, 480))
    np.testing.assert_array_equal(resumed.source_index(), np.arange(480))
    np.testing.assert_allclose(np.linalg.norm(resumed.read(0, 480), axis=1), 1, atol=1e-6)


def test_kmeans_resumes_from_the_last_complete_level_after_kill_9(tmp_path, capsys):
    rng = np.random.default_rng()
    centres = rng.normal(size=(100, 32))
    points = centres[rng.integers(0, 100, 8000)] + 0.3 * rng.normal(size=(8000, 32))
    np.save(tmp_path / "points.npy", points.astype(np.float32))
    argv = [f"--embeddings={tmp_path / 'points.npy'}", "--levels=200,40,8", "--iterations=10",
            "--init=random", "--noprogress"]
    for attempt in range(3):
        output = tmp_path / f"killed-{attempt}"
        process = _start("kmeans", *argv, f"--output={output}")
        if (_kill_when(process, (output / "level1.json").exists)
                and not (output / "level3.json").exists()):
            break
    else:
        pytest.fail("every run finished before it could be killed")
    level1_files = sorted(output.glob("level1*"))
    modified = [path.stat().st_mtime_ns for path in level1_files]
    _curate("kmeans", *argv, f"--output={output}")
    assert f"level 1: complete in {output}, skipped" in capsys.readouterr().out
    assert [path.stat().st_mtime_ns for path in level1_files] == modified
    _curate("kmeans", *argv, f"--output={tmp_path / 'whole'}")
    for name in ("level2_centroids", "level2_assignments", "level3_centroids",
                 "level3_assignments"):
        np.testing.assert_array_equal(np.load(output / f"{name}.npy"),
                                      np.load(tmp_path / "whole" / f"{name}.npy"))


@pytest.mark.slow
def test_the_whole_chain_on_the_demo(tmp_path, capsys):
    """Teacher trained on the demo -> embed -> dedup -> kmeans -> sample -> materialize ->
    training on the curated shards. The evaluation set is the pool's first 50 images, so
    relative dedup must drop exactly those."""
    env = {**ENV, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def train(workdir, *extra):
        result = subprocess.run([sys.executable, "-m", "dinov2_jax.main",
                                 "--config=configs/demo.py:tiny", f"--workdir={workdir}",
                                 "--config.train.total_steps=2", *extra], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    teacher, work = tmp_path / "teacher", tmp_path / "curation"
    train(teacher)
    _curate("recipe", "--config=configs/curation/demo.py:tiny", f"--workdir={work}",
            f"--config.weights={teacher}",
            "--config.against_images=('demo:train:num_images=50',)",
            "--config.dedup.threshold=0.9999", "--config.dedup.against_threshold=0.9999",
            "--config.embed.image_size=32")
    printed = capsys.readouterr().out
    assert "[6/6] python -m dinov2_jax.curate materialize" in printed
    keep = np.load(work / "keep.npy")
    assert np.isin(np.arange(50), keep).sum() == 0  # The evaluation images' copies.
    assert len(keep) > 300
    selection = np.load(work / "selection.npy")
    assert len(selection) == 160 and np.isin(selection, keep).all()
    assert sorted(p.name for p in (work / "clusters").glob("level*.json")) == [
        "level1.json", "level2.json"]
    lines = (work / "curated" / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == list(selection)
    shards = sorted((work / "curated").glob("*.array_record"))
    curated = sources.open_source(f"arrayrecord:{work / 'curated'}/*.array_record")
    demo = sources.open_source("demo:train:num_images=400")
    for position in (0, 77, 159):  # The stored images are the source's, losslessly.
        record, original = curated[position], demo[int(selection[position])]
        assert record["key"] == original["key"] and record["label"] == original["label"]
        np.testing.assert_array_equal(sources.decode_record(record), original["image"])
    assert len(curated) == 160 and shards
    train(tmp_path / "student", f"--config.train.dataset=arrayrecord:{work / 'curated'}/"
                                "*.array_record")
    assert (tmp_path / "student" / "checkpoints").exists()
    _curate("recipe", "--config=configs/curation/demo.py:tiny", f"--workdir={work}",
            f"--config.weights={teacher}",
            "--config.against_images=('demo:train:num_images=50',)",
            "--config.dedup.threshold=0.9999", "--config.dedup.against_threshold=0.9999",
            "--config.embed.image_size=32")
    rerun = capsys.readouterr().out  # Everything is done: nothing is recomputed.
    assert rerun.count("done already") == 3 and "level 1: complete" in rerun
