"""Training stages: warm starts (`train.init_from`, `train.freeze_backbone_steps`), the
high-resolution recipes and mixed-resolution batches (`crops.resolutions`).

Fast tests build `configs/demo.py:tiny` in process (a source checkpoint is a fresh state with
random centers, saved by the run's own Checkpointer) or run it as a subprocess with the helpers
of tests/test_main.py; the two slow tests start from the session's trained demo."""
import json
import os
import random
import re
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax import configs, parallel, weights
from dinov2_jax.data import pipeline, resolutions
from dinov2_jax.errors import ConfigError
from dinov2_jax.models import pos_embed
from dinov2_jax.train import checkpoint as checkpoint_lib
from dinov2_jax.train import setup as setup_lib
from dinov2_jax.train import warm_start
from test_main import (ENV, ROOT, TOTAL_STEPS, _assert_same_run, _command, _committed_steps,
                       _python, _python_ok, _run, _wait_for_checkpoint)

SOURCE_STEP = 8


def _tiny(**overrides):
    config = configs.load(os.path.join(ROOT, "configs/demo.py:tiny"))
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return configs.validate(config, jax.device_count())


def _build(config):
    return setup_lib.build(config, parallel.make_mesh(config.mesh))


def _snapshot(directory):
    """Every file under `directory` with its size, mtime and bytes' hash."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns,
                                                         hash(f.read()))
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A workdir holding one committed checkpoint (step 8) of demo:tiny at 40 px: a fresh
    state whose teacher differs from the student and whose centers are random."""
    workdir = tmp_path_factory.mktemp("source") / "run"
    config = _tiny()
    setup = _build(config)
    state = setup.create_state()
    rng = np.random.default_rng()
    state["teacher"] = jax.tree.map(
        lambda x: x + jnp.asarray(rng.normal(size=x.shape) * 1e-2, x.dtype), state["teacher"])
    state["centers"] = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), state["centers"])
    checkpointer = checkpoint_lib.Checkpointer(workdir)
    checkpointer.save(SOURCE_STEP, state, None, {"config": config.to_json(), "step": SOURCE_STEP})
    checkpointer.close()
    return str(workdir), jax.device_get(state)


def test_init_from_carries_the_networks_and_centers_and_resamples_the_tables(source):
    """48 px crops from a 40 px run: student, teacher and centers are the source's, each
    position table resampled 5x5 -> 6x6 with the model's interpolation, so the warm-started
    teacher at 48 px computes what the source's computes at 48 px; step, optimizer and
    schedules are fresh; nothing in the source changes."""
    workdir, saved = source
    before = _snapshot(workdir)
    config = _tiny(**{"crops.global_crops_size": 48, "train.init_from": workdir})
    setup = _build(config)
    state, line = warm_start.initial_state(setup)
    assert line.startswith(f"initialised from {workdir} (step {SOURCE_STEP} of ")
    assert "position tables resampled student 5x5 -> 6x6, teacher 5x5 -> 6x6" in line
    model = setup.networks.backbone.clone(drop_path_rate=0.0)
    for network in ("student", "teacher"):
        got, want = state[network], saved[network]
        for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
            name = jax.tree_util.keystr(path)
            value = got
            for key in path:
                value = value[key.key]
            if name.endswith("['pos_embed']"):
                want_table = pos_embed.interpolate_pos_embed(
                    jnp.asarray(leaf), 6, 6, offset=model.interpolate_offset,
                    antialias=model.interpolate_antialias)
                np.testing.assert_array_equal(value, want_table, err_msg=network)
                assert value.shape == (1, 37, leaf.shape[-1])
            else:
                np.testing.assert_array_equal(value, leaf, err_msg=f"{network}{name}")
    for name in ("dino", "ibot"):
        np.testing.assert_array_equal(state["centers"][name], saved["centers"][name])
    assert int(state["step"]) == 0 and int(state["opt_state"].count) == 0
    assert all(not np.any(x) for x in jax.tree.leaves(state["opt_state"].inner_state[1].mu))
    # The source's model at 48 px interpolates its 5x5 table on the fly to what is stored now.
    source_model = model.clone(img_size=40)
    images = jnp.asarray(np.random.default_rng().normal(size=(3, 48, 48, 3)), jnp.float32)
    got = jax.jit(model.apply)({"params": state["teacher"]["backbone"]},
                               images)["x_norm_clstoken"]
    want = jax.jit(source_model.apply)({"params": saved["teacher"]["backbone"]},
                                       images)["x_norm_clstoken"]
    # fp32, same ops in another order of fusion: agreement to a few ulps of O(1) features.
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert _snapshot(workdir) == before


def test_init_from_a_different_architecture_fails_naming_the_parameter(source):
    workdir, _ = source
    before = _snapshot(workdir)
    setup = _build(_tiny(**{"student.embed_dim": 48, "train.init_from": workdir}))
    with pytest.raises(ConfigError, match=re.escape("config error at train.init_from: ") +
                       r".*centers/dino|.*student/backbone/blocks/") as error:
        warm_start.initial_state(setup)
    message = str(error.value)
    assert re.search(r"student/backbone/\S+: this run has \(.*48.*\) float32, the checkpoint "
                     r"has \(.*32.*\) float32", message), message
    setup = _build(_tiny(**{"dino.head_n_prototypes": 256, "train.init_from": workdir}))
    with pytest.raises(ConfigError, match=re.escape(
            "centers/dino: this run has (256,) float32, the checkpoint has (1024,) float32")):
        warm_start.initial_state(setup)
    assert _snapshot(workdir) == before


def test_init_from_without_a_committed_checkpoint_fails_naming_the_path(tmp_path):
    empty = tmp_path / "empty"
    (empty / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
    for path, message in ((empty, "holds no committed checkpoint"),
                          (tmp_path / "missing", "does not exist")):
        setup = _build(_tiny(**{"train.init_from": str(path)}))
        with pytest.raises(ConfigError, match=re.escape(
                f"config error at train.init_from: {path} {message}")):
            warm_start.initial_state(setup)


@pytest.mark.parametrize("overrides,message", [
    ({"train.init_from": "/x", "student.pretrained_weights": "/y"},
     "train.init_from: set train.init_from (a whole run's state) or student.pretrained_weights"),
    ({"train.freeze_backbone_steps": 9}, "train.freeze_backbone_steps: 9 is not a step count "
                                         "in [0, 8]"),
    ({"crops.resolutions": ((40, 24, 0.5), (48, 24, 0.4))},
     "crops.resolutions: the probabilities sum to 0.9"),
    ({"crops.resolutions": ((40, 24, 0.5), (44, 24, 0.5))},
     "crops.resolutions: (44, 24, 0.5) is not (global_size, local_size, probability)"),
])
def test_bad_stage_settings_name_the_key(overrides, message):
    config = configs.load(os.path.join(ROOT, "configs/demo.py:tiny"))
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(f"config error at {message}")):
        configs.validate(config, 1)


@pytest.mark.parametrize("recipe", ["configs/demo.py:highres", "configs/vitl14_highres.py",
                                    "configs/vitg14_highres.py:smoke"])
def test_recipes_that_continue_a_run_require_init_from(recipe):
    config = configs.load(os.path.join(ROOT, recipe))
    with pytest.raises(ConfigError, match=re.escape(
            "config error at train.init_from: this recipe continues a trained run: pass "
            "--config.train.init_from=WORKDIR")):
        configs.validate(config, 1)
    config.train.init_from = "/some/run"
    configs.validate(config, 1)


def test_high_resolution_recipe_values():
    config = configs.load(os.path.join(ROOT, "configs/vitg14_highres.py"))
    config.train.init_from = "/run"
    assert (config.crops.global_crops_size, config.crops.local_crops_size) == (518, 224)
    assert configs.total_steps(config) == 10_000 and config.train.batch_size == 2048
    assert config.student.arch == "vit_giant2" and config.ibot.separate_head


def _without_bad(batch):
    return {k: v for k, v in batch.items() if k != pipeline.BAD_KEY}


def test_frozen_backbone_gets_zero_updates_and_the_teacher_does_not_drift():
    """freeze_backbone_steps=2: through step 2 student and teacher backbones stay at step 0's,
    bitwise, while the heads train (from step 2: the warm-up's lr is 0 at step 1); step 3
    moves the backbone."""
    config = _tiny(**{"train.freeze_backbone_steps": 2})
    setup = _build(config)
    state = setup.create_state()
    initial = jax.device_get(state)
    data = pipeline.make_train_iterator(config)
    batch = _without_bad(next(data))
    shardings = parallel.batch_shardings(setup.mesh, batch)
    step = setup.train_step(shardings)
    for step_number in (1, 2, 3):
        state, _ = step(state, parallel.global_batch(batch, shardings))
        batch = _without_bad(next(data))
        host = jax.device_get(state)
        frozen = step_number <= 2
        for network in ("student", "teacher"):
            same = jax.tree.map(np.array_equal, host[network]["backbone"],
                                initial[network]["backbone"])
            assert all(jax.tree.leaves(same)) == frozen, (network, step_number)
        heads_moved = not all(jax.tree.leaves(jax.tree.map(
            np.array_equal, host["student"]["dino_head"], initial["student"]["dino_head"])))
        assert heads_moved == (step_number > 1), step_number  # step 1's lr is 0 (warm-up)


def test_mixture_draws_are_a_pure_function_of_seed_and_step_and_masks_follow_the_size():
    mixture = ((40, 24, 0.5), (48, 24, 0.3), (32, 16, 0.2))
    draws = [resolutions.batch_resolution(7, k, [p for *_, p in mixture]) for k in range(400)]
    assert draws == [resolutions.batch_resolution(7, k, (0.5, 0.3, 0.2)) for k in range(400)]
    counts = np.bincount(draws, minlength=3) / 400
    # 400 draws: each share within 4 standard deviations (<= 0.1) of its probability.
    np.testing.assert_allclose(counts, (0.5, 0.3, 0.2), atol=0.1)
    config = _tiny(**{"crops.resolutions": mixture, "train.seed": 7})
    data = pipeline.make_train_iterator(config)
    for k in range(6):
        batch = next(data)
        global_size, local_size, _ = mixture[draws[k]]
        assert batch["global_crops"].shape == (2, 8, global_size, global_size, 3)
        assert batch["local_crops"].shape == (2, 8, local_size, local_size, 3)
        assert batch["masks"].shape == (2, 8, (global_size // 8) ** 2)
        assert batch["mask_indices"].max() < 2 * 8 * (global_size // 8) ** 2


MIXTURE = "((40, 24, 0.4), (48, 24, 0.3), (32, 16, 0.3))"


def test_mixed_resolution_warm_start_compiles_one_step_per_shape_and_resumes_bitwise(
        source, tmp_path):
    """A 48-step demo:tiny run from `train.init_from` with 3 crop size pairs: exactly 3 train
    step compilations (JAX's compile log), the source untouched; killed with -9 after a
    checkpoint and rerun with the source moved away, it resumes from its own checkpoints and
    ends bitwise equal to the uninterrupted run."""
    workdir_source, _ = source
    moved = str(tmp_path / "source")
    shutil.copytree(workdir_source, moved)
    before = _snapshot(moved)
    extra = (f"--config.train.init_from={moved}", f"--config.crops.resolutions={MIXTURE}")
    uninterrupted = str(tmp_path / "uninterrupted")
    result = subprocess.run(_command(uninterrupted, *extra), cwd=ROOT, capture_output=True,
                            text=True, timeout=900, env={**ENV, "JAX_LOG_COMPILES": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initialised from {moved} (step {SOURCE_STEP}" in result.stdout
    compiles = re.findall(r"Compiling jit\(train_step\) with global shapes and types "
                          r"\((.*?)\)\. Argument mapping", result.stderr)
    assert len(compiles) == 3, result.stderr[-3000:]
    assert len(set(compiles)) == 3
    draws = {resolutions.batch_resolution(0, k, (0.4, 0.3, 0.3)) for k in range(TOTAL_STEPS)}
    assert draws == {0, 1, 2}
    assert _snapshot(moved) == before
    killed = str(tmp_path / "killed")
    for _ in range(3):  # the run may reach its end before the kill on a fast machine
        shutil.rmtree(killed, ignore_errors=True)
        process = subprocess.Popen(_command(killed, *extra), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env=ENV)
        _wait_for_checkpoint(process, killed, after=random.choice([0, 4, 8, 12, 16]),
                             timeout=600)
        time.sleep(random.uniform(0, 0.2))
        process.kill()
        process.wait()
        if _committed_steps(killed)[-1] < TOTAL_STEPS:
            break
    assert _committed_steps(killed)[-1] < TOTAL_STEPS, "the run always ended before the kill"
    os.rename(moved, moved + "_gone")  # the resumed run must not need it
    result = _run(killed, *extra, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step" in result.stdout and "initialised from" not in result.stdout
    _assert_same_run(uninterrupted, killed, TOTAL_STEPS)


def _knn_at_end(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [line for line in lines if "knn/top1" in line][-1]


@pytest.mark.slow
def test_frozen_backbone_keeps_the_pretrained_knn_while_new_heads_train(trained_demo, tmp_path):
    """The demo warm-started from the trained demo's teacher backbone (a weights dir, heads
    new), 100 steps: with train.freeze_backbone_steps=100 the k-NN at the end stays within 2
    points of the source teacher's (its backbone is the source's, bitwise), without the freeze
    the new heads' gradients pull the backbone away and it drops (measured on a 2-core CPU:
    source 22.8, frozen 22.8, not frozen 21.4)."""
    model, params = weights.load(trained_demo.workdir)
    weights.save(tmp_path / "backbone", model, params)
    source_top1 = [line for line in trained_demo.metrics if "knn/top1" in line][-1]["knn/top1"]
    top1 = {}
    for steps in (100, 0):
        workdir = tmp_path / f"freeze_{steps}"
        _python_ok("-m", "dinov2_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
                   f"--config.student.pretrained_weights={tmp_path / 'backbone'}",
                   "--config.train.total_steps=100",
                   f"--config.train.freeze_backbone_steps={steps}",
                   "--config.evaluation.at_start=False")
        end = _knn_at_end(workdir)
        assert end["step"] == 100
        top1[steps] = end["knn/top1"]
    print(f"warm start from the demo (k-NN top-1 {source_top1:.1f}), 100 steps: frozen backbone "
          f"{top1[100]:.1f}, trained backbone {top1[0]:.1f}")
    assert abs(top1[100] - source_top1) <= 2, (source_top1, top1)
    assert top1[0] < source_top1, (source_top1, top1)  # measured: 22.8 -> 22.8 / 21.4


def _knn_cli(weights_path, output):
    _python_ok("-m", "dinov2_jax.eval.knn", f"--weights={weights_path}", "--train=demo:train",
               "--val=demo:val", "--size=64", f"--output={output}")
    return json.load(open(output))["results"]["knn/top1"]


@pytest.mark.slow
def test_demo_highres_improves_knn_at_64px_over_its_source(trained_demo, tmp_path):
    """configs/demo.py:highres from the trained demo (40 px crops): after its short phase at
    the images' native 64 px, k-NN at 64 px (the k-NN CLI) beats the source teacher's at 64 px
    (its 5x5 position table interpolated on the fly). Measured on a 2-core CPU: 18.2 -> 18.6,
    two of the 500 val images: the phase barely moves k-NN at this size."""
    workdir = tmp_path / "highres"
    result = _python_ok("-m", "dinov2_jax.main", "--config=configs/demo.py:highres",
                        f"--workdir={workdir}", f"--config.train.init_from={trained_demo.workdir}")
    assert "position tables resampled student 5x5 -> 8x8, teacher 5x5 -> 8x8" in result.stdout
    before = _knn_cli(trained_demo.workdir, tmp_path / "source.json")
    after = _knn_cli(workdir, tmp_path / "highres.json")
    print(f"demo.py:highres: k-NN top-1 at 64 px {before:.1f} (source) -> {after:.1f}")
    assert after > before, (before, after)
