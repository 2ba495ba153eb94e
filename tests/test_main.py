"""The main job end to end: exact resume after kill -9 and SIGTERM, truncated checkpoints,
divergence, config errors, the recipes' smoke variants, and the demo's learning. Each run is a
real subprocess of `python -m dinov2_jax.main`, on `configs/demo.py:tiny` (about 10-20 s on 2
CPU cores) except the full demo (a few minutes)."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from dinov2_jax import configs
from dinov2_jax.eval import dense_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("img_per_sec", "mfu")
# 48 steps, a checkpoint every 4 and a log line every 2.
TOTAL_STEPS = 48
TINY = ["--config=configs/demo.py:tiny", "--config.optim.epochs=12",
        "--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=10"]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _python(*args, timeout=300):
    """`python ARGS` in the project root, on CPU; the completed process."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _command(workdir, *extra):
    return [sys.executable, "-m", "dinov2_jax.main", *TINY, f"--workdir={workdir}", *extra]


def _run(workdir, *extra, timeout=300):
    return _python(*_command(workdir, *extra)[1:], timeout=timeout)


def _start(workdir, *extra):
    return subprocess.Popen(_command(workdir, *extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _committed_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _wait_for_checkpoint(process, workdir, after, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if any(step > after for step in _committed_steps(workdir)):
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _state(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.PyTreeCheckpointer().restore(path)


def _last_metrics(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    last = [line for line in lines if "total_loss" in line][-1]
    return {k: v for k, v in last.items() if k not in TIMING_KEYS and not k.startswith("data/")}


def _assert_same_run(workdir_a, workdir_b, step, networks=("student", "teacher", "centers")):
    state_a, state_b = _state(workdir_a, step), _state(workdir_b, step)
    for name in networks:
        leaves_a = jax.tree_util.tree_flatten_with_path(state_a[name])[0]
        leaves_b = jax.tree.leaves(state_b[name])
        assert len(leaves_a) == len(leaves_b)
        for (path, a), b in zip(leaves_a, leaves_b):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}{jax.tree_util.keystr(path)}")
    assert _last_metrics(workdir_a) == _last_metrics(workdir_b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = _run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _committed_steps(workdir)[-1] == TOTAL_STEPS
    return workdir


def test_kill_9_then_rerun_is_bitwise_identical(uninterrupted, tmp_path):
    workdir = str(tmp_path / "killed")
    # A random step after the first checkpoint, at least 24 steps (~0.5 s here) before the end.
    # On a fast or lightly loaded machine the run can still reach the end first; then the
    # kill tested nothing, so try again in a fresh workdir (at most three times).
    for _ in range(3):
        shutil.rmtree(workdir, ignore_errors=True)
        process = _start(workdir)
        _wait_for_checkpoint(process, workdir, after=random.choice([0, 4, 8, 12, 16, 20]))
        time.sleep(random.uniform(0, 0.2))
        process.kill()
        process.wait()
        if _committed_steps(workdir)[-1] < TOTAL_STEPS:
            break
    assert _committed_steps(workdir)[-1] < TOTAL_STEPS, "the run always ended before the kill"
    result = _run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step" in result.stdout
    _assert_same_run(uninterrupted, workdir, TOTAL_STEPS)


def test_sigterm_saves_exits_0_and_resumes_identically(uninterrupted, tmp_path):
    workdir = str(tmp_path / "preempted")
    process = _start(workdir)
    _wait_for_checkpoint(process, workdir, after=0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    saved = _committed_steps(workdir)[-1]
    assert 4 <= saved < TOTAL_STEPS
    result = _run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {saved}" in result.stdout
    _assert_same_run(uninterrupted, workdir, TOTAL_STEPS)


def test_a_gram_run_resumes_its_frozen_gram_teacher_from_the_checkpoint(tmp_path):
    """Gram anchoring (demo:tiny, 16 steps): the EMA teacher is copied into the Gram teacher at
    step 4, which then stays frozen while the teacher moves on. A rerun from checkpoint 8 (the
    later ones removed, as after a crash) must restore that copy, not copy again nor rebuild
    it, so its step-16 state (Gram teacher included) and losses equal the uninterrupted run."""
    gram = ["--config=configs/demo.py:tiny", "--config.optim.epochs=4",
            "--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=10",
            "--config.gram.use_loss=True", "--config.gram.it_load_ema_teacher=4",
            "--config.gram.rep_update=False"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = _python("-m", "dinov2_jax.main", *gram, f"--workdir={full}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _committed_steps(full) == [4, 8, 12, 16]
    shutil.copytree(full, resumed)
    for step in (12, 16):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    result = _python("-m", "dinov2_jax.main", *gram, f"--workdir={resumed}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 8" in result.stdout
    at_8 = _state(full, 8)
    gram_teacher = jax.tree.leaves(at_8["gram_teacher"])
    assert any(not np.array_equal(a, b) for a, b in
               zip(gram_teacher, jax.tree.leaves(at_8["teacher"]["backbone"])))
    _assert_same_run(full, resumed, 16, ("student", "teacher", "centers", "gram_teacher"))
    gram_losses = [json.loads(line).get("gram_loss") for line in open(resumed / "metrics.jsonl")]
    assert any(loss for loss in gram_losses if loss), gram_losses


def test_truncated_checkpoint_is_skipped_with_a_warning(uninterrupted, tmp_path):
    workdir = str(tmp_path / "truncated")
    shutil.copytree(uninterrupted, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS)))
    # The step before cut off mid-write: its array data is truncated.
    state_dir = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS - 4), "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    result = _run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint at step {TOTAL_STEPS - 4} is unreadable" in result.stderr
    assert f"resumed from step {TOTAL_STEPS - 8}" in result.stdout
    assert os.listdir(os.path.join(workdir, "checkpoints_unreadable"))
    _assert_same_run(uninterrupted, workdir, TOTAL_STEPS)


def _snapshot(workdir):
    """Every file under workdir with its bytes' hash: what a failed rerun must leave alone."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hash(f.read())
    return out


def test_config_mismatch_rerun_changes_nothing(tmp_path):
    """A rerun whose config changes the state's shape fails naming the key; every checkpoint
    and config.json stay as they were (the meta is read before the state)."""
    workdir = str(tmp_path / "run")
    result = _python("-m", "dinov2_jax.main", "--config=configs/demo.py:tiny",
                     f"--workdir={workdir}", "--config.profile_steps=3,5")
    assert result.returncode == 0, result.stderr[-3000:]
    # The profiler option on the way: a trace of steps 3-5 and its top ops in the workdir.
    assert "profile of steps [3, 5]" in result.stdout
    assert "ms per step" in open(os.path.join(workdir, "profile", "top_ops.txt")).read()
    before = _snapshot(workdir)
    result = _python("-m", "dinov2_jax.main", "--config=configs/demo.py:tiny",
                     f"--workdir={workdir}", "--config.ibot.separate_head=True")
    assert result.returncode == 1
    assert "config error at ibot.separate_head" in result.stderr
    assert "Traceback" not in result.stderr
    assert _snapshot(workdir) == before
    assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))


def test_state_mismatch_the_config_cannot_see_fails_naming_the_leaf(tmp_path):
    """A checkpoint whose meta matches the config but whose state has other shapes (here: a
    checkpoint made with 256 iBOT prototypes, its meta edited to claim 1024) is an error naming
    the first differing leaf, never a silent restart from step 0."""
    workdir = str(tmp_path / "run")
    result = _python("-m", "dinov2_jax.main", "--config=configs/demo.py:tiny",
                     f"--workdir={workdir}", "--config.dino.head_n_prototypes=256",
                     "--config.ibot.head_n_prototypes=256")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = _committed_steps(workdir)
    for step in steps:
        meta_file = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
        meta = json.load(open(meta_file))
        saved = json.loads(meta["config"])
        saved["dino"]["head_n_prototypes"] = saved["ibot"]["head_n_prototypes"] = 1024
        meta["config"] = json.dumps(saved)
        json.dump(meta, open(meta_file, "w"))
    before = _snapshot(workdir)
    result = _python("-m", "dinov2_jax.main", "--config=configs/demo.py:tiny",
                     f"--workdir={workdir}")
    assert result.returncode == 1
    assert f"the checkpoint at step {steps[-1]}" in result.stderr
    assert "centers/dino: this run has (1024,) float32, the checkpoint has (256,) float32" \
        in result.stderr, result.stderr[-2000:]
    assert _snapshot(workdir) == before


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "diverged")
    result = _run(workdir, "--config.optim.base_lr=1e38", "--config.train.checkpoint_every=1")
    assert result.returncode == 1
    assert "non-finite values at step" in result.stderr
    assert "losses" in result.stderr
    steps = _committed_steps(workdir)
    assert steps, "the checkpoints before the divergence are kept"
    diverged_at = int(result.stderr.split("non-finite values at step ")[1].split(":")[0])
    assert steps[-1] < diverged_at
    state = _state(workdir, steps[-1])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["student"]))


def _tiny_config():
    return configs.load(os.path.join(ROOT, "configs/demo.py:tiny"))


@pytest.mark.parametrize("key,value,message", [
    ("crops.global_crops_size", 30, "crops.global_crops_size: 30 is not a positive multiple of "
                                    "student.patch_size=8"),
    ("train.batch_size", 6, "train.batch_size: global batch 6 is not divisible by the 4 devices"),
    ("optim.warmup_epochs", 5, "optim.warmup_epochs: 5 epochs exceed optim.epochs=2"),
    ("train.centering", "sinkhorn", "train.centering: 'sinkhorn' is not one of"),
    ("student.arch", "vit_huge", "student.arch: 'vit_huge' is not one of"),
    ("student.remat_policy", "some", "student.remat_policy: 'some' is not one of"),
    ("student.attention", "flash", "student.attention: 'flash' is not one of"),
    ("student.ffn_layer", "moe", "student.ffn_layer: 'moe' is not one of"),
    ("mesh.fsdp", 3, "mesh: mesh data=-1 x fsdp=3 does not divide 4 devices"),
    ("student.drop_path_rate", 1.5, "student.drop_path_rate: 1.5 is not in [0, 1)"),
    ("train.batch_size", 4, "train.batch_size: 4 images in 4 mask groups: KoLeo needs at least 2"),
    ("crops.color_jitter", (0.4, 0.4, 0.2, 0.7), "crops.color_jitter: (0.4, 0.4, 0.2, 0.7) is not"),
    ("crops.grayscale_prob", 1.2, "crops.grayscale_prob: 1.2 is not in [0, 1]"),
    ("optim.base_lr", -1.0, "optim.base_lr: -1.0 must be > 0"),
    ("optim.weight_decay", -0.1, "optim.weight_decay: -0.1 must be >= 0"),
    ("teacher.teacher_temp", 0.0, "teacher.teacher_temp: 0.0 must be > 0"),
    ("teacher.momentum_teacher", 1.5, "teacher.momentum_teacher: 1.5 is not in [0, 1]"),
    ("crops.local_crops_scale", (0.4, 0.1), "crops.local_crops_scale: (0.4, 0.1) is not an "
                                            "ordered interval"),
    ("train.collapse_uniform", 1.5, "train.collapse_uniform: 1.5 is not in [0, 1]"),
])
def test_bad_configs_name_the_key(key, value, message):
    config = _tiny_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(configs.ConfigError, match=re.escape(f"config error at {message}")):
        configs.validate(config, device_count=4)


def test_unknown_keys_are_rejected():
    config = _tiny_config()
    config.train.learning_rate = 0.1
    with pytest.raises(ValueError, match="config error at train.learning_rate: unknown key"):
        configs.validate(config, device_count=1)
    result = _run("/tmp/unused", "--config.optim.lrr=1", timeout=120)
    assert result.returncode != 0 and "lrr" in result.stderr


def test_bad_config_fails_at_start_up_from_the_command_line(tmp_path):
    result = _run(str(tmp_path / "bad"), "--config.crops.local_crops_size=20")
    assert result.returncode == 1
    assert "config error at crops.local_crops_size" in result.stderr
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


@pytest.mark.parametrize("recipe", ["vitg14.py:smoke", "vitl14.py:smoke",
                                    "dinov3_vitl16_im1k.py:smoke",
                                    "dinov3_vit7b16.py:pretrain,smoke",
                                    "dinov3_vit7b16.py:gram,smoke",
                                    "dinov3_vit7b16.py:highres,smoke"])
def test_recipe_smoke_runs_on_cpu(tmp_path, recipe):
    """The recipe's :smoke (and for vitg14/vitl14 its high-resolution phase's :smoke from
    that run)."""
    workdir = str(tmp_path / recipe.replace(":", "_").replace(",", "_"))
    short = ("--config.optim.epochs=1", "--config.optim.warmup_epochs=0",
             "--config.teacher.warmup_teacher_temp_epochs=0",
             "--config.optim.freeze_last_layer_epochs=0")
    result = _python(
        "-m", "dinov2_jax.main", f"--config=configs/{recipe}", f"--workdir={workdir}", *short)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [line["total_loss"] for line in lines if "total_loss" in line]
    assert len(losses) == 3 and all(np.isfinite(losses))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["train"]["centering"] == "sinkhorn_knopp" and saved["ibot"]["separate_head"]
    if saved["gram"]["use_loss"]:  # the Gram teacher is copied at step 1: the loss is on
        gram = [line["gram_loss"] for line in lines if "gram_loss" in line]
        assert gram[0] == 0 and all(value > 0 for value in gram[1:]), gram
    if recipe not in ("vitg14.py:smoke", "vitl14.py:smoke"):
        return
    highres = str(tmp_path / f"{recipe[:6]}_highres")
    result = _python("-m", "dinov2_jax.main", f"--config=configs/{recipe[:6]}_highres.py:smoke",
                     f"--workdir={highres}", f"--config.train.init_from={workdir}", *short)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"initialised from {workdir} (step 3 of" in result.stdout and
            "resampled student 2x2 -> 3x3, teacher 2x2 -> 3x3" in result.stdout), result.stdout
    lines = [json.loads(line) for line in open(os.path.join(highres, "metrics.jsonl"))]
    losses = [line["total_loss"] for line in lines if "total_loss" in line]
    assert len(losses) == 3 and all(np.isfinite(losses))


def _python_ok(*args):
    result = _python(*args, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _linear_top1(weights, output):
    _python_ok("-m", "dinov2_jax.eval.linear", f"--weights={weights}", "--train=demo:train",
               "--val=demo:val", "--size=40", f"--output={output}")
    return json.load(open(output))["results"]["linear/top1"]


@pytest.mark.slow
def test_readme_demo_learns(trained_demo, tmp_path):
    """The README's first command, unchanged, learns through every objective: k-NN top-1 on
    demo:val gains at least 10 points over the same model at random init, the teacher's DINO
    targets end sharp (mean per-image entropy <= 0.9 log K) with the prototypes in use (entropy
    of the batch mean >= 0.5 log K), the DINO losses move, and the linear probe CLI on its
    checkpoint gains at least 5 (measured: k-NN 12.0 -> 22.8, DINO 0.31 / 0.54 log K)."""
    lines = trained_demo.metrics
    knn = {line["step"]: line["knn/top1"] for line in lines if "knn/top1" in line}
    total = configs.total_steps(configs.load(os.path.join(ROOT, "configs/demo.py")))
    assert sorted(knn) == [0, total]
    last = [line for line in lines if "dino/entropy" in line][-1]
    print(f"demo: {trained_demo.seconds:.0f} s, k-NN top-1 {knn[0]:.1f} -> {knn[total]:.1f}, "
          f"DINO entropy {last['dino/entropy']:.3f} / batch {last['dino/batch_entropy']:.3f}")
    assert knn[total] - knn[0] >= 10, knn
    assert last["step"] == total and last["dino/entropy"] <= 0.9, last
    assert last["dino/batch_entropy"] >= 0.5, last
    # The DINO losses move: no stretch of 500 steps from step 250 on with the local-crop loss
    # inside a 0.01 band (the collapsed demo of old sat at 4.621 from step ~250 to the end).
    dino = [(line["step"], line["dino_local_crops_loss"]) for line in lines
            if "dino_local_crops_loss" in line and line["step"] >= 250]
    for step, _ in dino:
        window = [value for s, value in dino if step <= s < step + 500]
        if dino[-1][0] >= step + 499:
            assert max(window) - min(window) > 0.01, (step, window)
    assert trained_demo.stdout.splitlines()[-1].startswith(f"finished step {total}/{total}")
    # Random init: the same config and seed stopped after one step, whose lr is 0 (warmup).
    init = tmp_path / "init"
    _python_ok("-m", "dinov2_jax.main", "--config=configs/demo.py", f"--workdir={init}",
               "--config.train.total_steps=1", "--config.evaluation.knn_train=",
               "--config.evaluation.knn_val=")
    linear = {"init": _linear_top1(init, tmp_path / "init.json"),
              "trained": _linear_top1(trained_demo.workdir, tmp_path / "trained.json")}
    print(f"demo: linear top-1 {linear['init']:.1f} -> {linear['trained']:.1f}")
    assert linear["trained"] - linear["init"] >= 5, linear


@pytest.mark.slow
def test_demo_v3_learns_and_its_gram_loss_falls(tmp_path):
    """`configs/demo.py:v3` (RoPE, 4 storage tokens, Gram anchoring from step N): k-NN top-1
    on demo:val gains at least 10 points over random init, and the Gram loss, off (0) before
    step N, falls from its first logged value after N to the last."""
    workdir = tmp_path / "v3"
    start = time.time()
    result = _python("-m", "dinov2_jax.main", "--config=configs/demo.py:v3",
                     f"--workdir={workdir}", timeout=2400)
    seconds = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    config = configs.load(os.path.join(ROOT, "configs/demo.py:v3"))
    total, gram_start = configs.total_steps(config), config.gram.it_load_ema_teacher
    knn = {line["step"]: line["knn/top1"] for line in lines if "knn/top1" in line}
    gram = [(line["step"], line["gram_loss"]) for line in lines if "gram_loss" in line]
    print(f"demo:v3: {seconds:.0f} s, k-NN top-1 {knn[0]:.1f} -> {knn[total]:.1f}, gram loss "
          f"{[round(value, 4) for _, value in gram if _ > gram_start]}")
    assert knn[total] - knn[0] >= 10, knn
    assert all(value == 0 for step, value in gram if step <= gram_start)
    after = [value for step, value in gram if step > gram_start]
    assert len(after) >= 2 and after[-1] < after[0], gram


@pytest.fixture
def small_disk(tmp_path):
    """A 7 MB tmpfs (root only): room for two demo:tiny checkpoints, not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_one_line_and_the_rerun_resumes(small_disk):
    workdir = str(small_disk / "run")
    args = ("-m", "dinov2_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
            "--config.optim.epochs=6", "--config.train.keep_checkpoints=10")
    result = _python(*args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        re.escape(f"error: no space left writing checkpoint 12 at {workdir}/checkpoints") +
        r" \(\d+\.\d MiB to write, \d+\.\d MiB free\); " + re.escape(
            "checkpoint 8 is intact; rerun the same command to resume once there is space"),
        lines[0]), result.stderr[-3000:]
    intact = _state(workdir, 8)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(intact["student"]))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    result = _python(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 8" in result.stdout
    assert _committed_steps(workdir)[-1] == 24


def _children(pid):
    """PIDs whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_data_workers_exit_when_the_trainer_is_killed(tmp_path):
    workdir = str(tmp_path / "workers")
    process = _start(workdir, "--config.train.num_workers=2")
    _wait_for_checkpoint(process, workdir, after=0)
    workers = _children(process.pid)
    assert len(workers) >= 2, workers  # the two Grain workers (and maybe a resource tracker)
    process.kill()
    process.wait()
    deadline = time.time() + 5
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "a data worker outlived the trainer"


def test_tensorboard_events_hold_every_logged_metric(uninterrupted):
    """With the tensorboard extra installed, every scalar of metrics.jsonl is also an event
    (read back with TensorBoard's own reader; no TensorFlow involved)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing."
                                            "event_accumulator")
    pytest.importorskip("tensorboardX")
    events = event_accumulator.EventAccumulator(os.path.join(uninterrupted, "tensorboard"),
                                                size_guidance={"scalars": 0})
    events.Reload()
    lines = [json.loads(line) for line in open(os.path.join(uninterrupted, "metrics.jsonl"))]
    logged = {(line["step"], name): value for line in lines for name, value in line.items()
              if name != "step" and isinstance(value, (int, float)) and value is not None}
    got = {(event.step, name): event.value for name in events.Tags()["scalars"]
           for event in events.Scalars(name)}
    assert {"total_loss", "lr", "teacher_temp", "img_per_sec"} <= set(events.Tags()["scalars"])
    assert got.keys() == logged.keys()
    for key, value in logged.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key  # events store float32


COLLAPSE = {
    # Teacher temperature 1.0: targets near uniform from the first step.
    "uniform": ["--config.teacher.teacher_temp=1.0", "--config.teacher.warmup_teacher_temp=1.0"],
    # No centering, LayerScale 1e-5 (every image's cls token nearly the same) and a very sharp
    # teacher: every image's target is the same single prototype.
    "one-prototype": ["--config.train.centering=none", "--config.student.layerscale=1e-5",
                      "--config.teacher.teacher_temp=0.002",
                      "--config.teacher.warmup_teacher_temp=0.002"],
}


@pytest.mark.parametrize("kind", sorted(COLLAPSE))
def test_forced_collapse_is_detected_and_stops_with_checkpoints_intact(tmp_path, kind):
    workdir = str(tmp_path / kind)
    common = ["-m", "dinov2_jax.main", "--config=configs/demo.py:tiny", "--config.train.log_every=1",
              "--config.train.checkpoint_every=2", "--config.train.collapse_intervals=3",
              *COLLAPSE[kind]]
    result = _python(*common, f"--workdir={workdir}", "--config.train.stop_on_collapse=True")
    assert result.returncode == 1
    assert f"the dino head's teacher has been collapsed ({kind}) for 3 log intervals at step 3" \
        in result.stderr, result.stderr[-3000:]
    assert "train.stop_on_collapse stops the run" in result.stderr
    assert _committed_steps(workdir) == [2]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_state(workdir, 2)["student"]))
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all(0 <= line[f"{head}/{name}"] <= 1 for line in lines if "total_loss" in line
               for head in ("dino", "ibot") for name in ("entropy", "batch_entropy"))
    # Without stop_on_collapse the same run warns and trains to the end.
    result = _python(*common, f"--workdir={workdir}_warned")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"collapsed ({kind})" in result.stderr and "stop_on_collapse=True would stop" \
        in result.stderr


def test_a_truncated_shard_stops_the_run_at_start_up_or_is_skipped_and_counted(tmp_path):
    """A shard cut in half is a one-line start-up error naming it; with
    train.skip_bad_shards=True the run trains through and logs the skipped records."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng()
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    shards = tmp_path / "shards"
    result = _python("-m", "dinov2_jax.data.prepare", f"--images={images}", f"--output={shards}",
                     "--shards=3")
    assert result.returncode == 0, result.stderr[-3000:]
    cut = sorted(shards.glob("*.array_record"))[1]
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    args = ("-m", "dinov2_jax.main", "--config=configs/demo.py:tiny",
            f"--config.train.dataset=arrayrecord:{shards}/*.array_record",
            "--config.train.total_steps=2", "--config.train.log_every=1")
    result = _python(*args, f"--workdir={tmp_path / 'stopped'}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: arrayrecord shard {cut} cannot be read"), \
        result.stderr[-3000:]
    assert "train.skip_bad_shards=True" in result.stderr and "Traceback" not in result.stderr
    workdir = tmp_path / "skipped"
    result = _python(*args, f"--workdir={workdir}", "--config.train.skip_bad_shards=True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping unreadable arrayrecord shard {cut}" in result.stderr
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    skipped = [line for line in lines if "data/skipped_shards" in line]
    assert skipped == [{"step": 0, "data/skipped_shards": 1, "data/skipped_shard_records": 8}]
    assert [line["step"] for line in lines if "total_loss" in line] == [1, 2]


@pytest.mark.slow
def test_dense_evals_during_training_land_in_metrics(tmp_path):
    """evaluation.segmentation_* / depth_* run the dense probes at the end of a run (and at
    step 0 with evaluation.at_start), their metrics in metrics.jsonl."""
    scenes = dense_data.write_shapes_dataset(tmp_path / "ade", "training", 16, 40)
    dense_data.write_shapes_dataset(scenes, "validation", 8, 40)
    depth = dense_data.write_depth_dataset(tmp_path / "depth", 16, 40)
    workdir = tmp_path / "run"
    result = _python("-m", "dinov2_jax.main", "--config=configs/demo.py:tiny",
                     f"--workdir={workdir}", "--config.evaluation.at_start=True",
                     f"--config.evaluation.segmentation_train=ade20k:{scenes}:training:"
                     "num_classes=4",
                     f"--config.evaluation.segmentation_val=ade20k:{scenes}:validation:"
                     "num_classes=4",
                     f"--config.evaluation.depth_train=depthfolder:{depth}",
                     f"--config.evaluation.depth_val=depthfolder:{depth}",
                     "--config.evaluation.dense_steps=20", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    dense = {line["step"]: line for line in lines if "segmentation/mIoU" in line}
    assert sorted(dense) == [0, 8]
    assert all(0 <= d["segmentation/mIoU"] <= 100 and d["depth/rmse"] > 0 for d in dense.values())
