"""Distillation (dinov2_jax/train/distill.py, train/teacher.py): the step against a frozen
teacher without masks, the spare EMA student and its export, the start-up errors, several
students in one step equal to one run each (and faster), the distilled recipes' smoke runs,
and (slow) the demo's distilled student beating the same student trained from scratch.

The teacher of the fast tests is a demo:tiny-sized run's state at random init, saved as a
training checkpoint (no training needed to test what is read and how); fresh random crops and
masks are drawn per test."""
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dinov2_jax import configs, convert, losses, parallel, weights
from dinov2_jax.data import masking
from dinov2_jax.errors import ConfigError
from dinov2_jax.train import checkpoint as checkpoint_lib
from dinov2_jax.train import distill, loop
from dinov2_jax.train import teacher as teacher_lib
from dinov2_jax.train import setup as setup_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
TEACHER_STEP = 5


def tiny(**student):
    """demo:tiny (40 px global crops of 25 patches, 2 local of 24 px, batch 8), no drop path."""
    config = configs.load("configs/demo.py:tiny")
    config.student.update({"drop_path_rate": 0.0, "attention": "xla", **student})
    return config


def save_run_state(config, workdir, step=TEACHER_STEP, seed=0):
    """A training checkpoint of `config`'s state at random init (centers made non-zero), as the
    loop writes it; returns that state."""
    setup = setup_lib.build(config, parallel.make_mesh(config.mesh))
    state = setup.create_state()
    rng = np.random.default_rng(seed)
    state["centers"] = jax.tree.map(
        lambda c: jnp.asarray(rng.normal(size=c.shape), jnp.float32), state["centers"])
    checkpointer = checkpoint_lib.Checkpointer(workdir)
    checkpointer.save(step, state, None, {"config": config.to_json(), "step": step,
                                          "process_count": 1})
    checkpointer.close()
    return state


def snapshot(directory):
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher") / "run")
    state = save_run_state(tiny(), workdir)
    return workdir, jax.device_get(state)


def distill_config(teacher, **student):
    config = tiny(embed_dim=16, **student)
    config.optim.warmup_epochs = 0  # the lr moves the student from step 0
    config.distillation.teacher = teacher
    return config


def random_batch(config, rng):
    """Fresh random crops and iBOT masks in the data pipeline's layout (one mask group)."""
    crops, b = config.crops, config.train.batch_size
    grid = crops.global_crops_size // config.student.patch_size
    masks = np.zeros((2 * b, grid * grid), bool)
    for row in masks:
        row[rng.choice(grid * grid, rng.integers(1, grid * grid // 2), replace=False)] = True
    upperbound = masking.mask_upperbound(2 * b, grid * grid, config.ibot.mask_ratio_min_max,
                                         config.ibot.mask_sample_probability)
    indices, weights_ = masking.padded_mask_indices(masks[:, :], max(upperbound, masks.sum()))
    size, local = crops.global_crops_size, crops.local_crops_size
    return {"global_crops": rng.normal(size=(2, b, size, size, 3)).astype(np.float32),
            "local_crops": rng.normal(size=(crops.local_crops_number, b, local, local, 3)
                                      ).astype(np.float32),
            "masks": masks.reshape(2, b, -1), "mask_indices": indices[None],
            "masks_weight": weights_[None]}


_STEPS = {}


def jitted_step(setup, batch):
    """(step, batch shardings) of `setup`, compiled once per setup."""
    if id(setup) not in _STEPS:
        shardings = parallel.batch_shardings(setup.mesh, batch)
        _STEPS[id(setup)] = (setup, setup.train_step(shardings), shardings)
    return _STEPS[id(setup)][1:]


def run_steps(setup, batches):
    """(final state, per-step host metrics) of `batches` through the setup's jitted step."""
    step, shardings = jitted_step(setup, batches[0])
    state, history = setup.create_state(), []
    for batch in batches:
        state, metrics = step(state, parallel.global_batch(batch, shardings))
        history.append(jax.device_get(metrics))
    return state, history


def test_a_step_is_dinov2_losses_against_the_frozen_teacher_without_masks(teacher_dir):
    """One step: the teacher run's centers are the start; iBOT is the mean cross-entropy over
    every global-crop patch (computed here by hand from the two networks); the data's masks
    change nothing; the spare EMA is m * student_0 + (1 - m) * student_1; the teacher stays
    as on disk."""
    workdir, saved = teacher_dir
    before = snapshot(workdir)
    config = distill_config(workdir)
    configs.validate(config, 1)
    setup = distill.build(config, parallel.make_mesh(config.mesh))
    state0 = jax.device_get(setup.create_state())
    for name in ("dino", "ibot"):
        np.testing.assert_array_equal(state0["centers"][name], saved["centers"][name])
    rng = np.random.default_rng()
    batch = random_batch(config, rng)
    other_masks = {**batch, **{k: v for k, v in random_batch(config, rng).items()
                               if k.startswith("mask")}}
    state1, (metrics,) = run_steps(setup, [batch])
    _, (metrics_other_masks,) = run_steps(setup, [other_masks])
    assert metrics == metrics_other_masks

    teacher_params, _ = setup.teacher_state
    for a, b in zip(jax.tree.leaves(jax.device_get(teacher_params)),
                    jax.tree.leaves(saved["teacher"])):
        np.testing.assert_array_equal(a, b)
    assert snapshot(workdir) == before

    # iBOT by hand: per global crop, teacher patch logits -> centered softmax targets; the
    # student's patch logits; the mean cross-entropy over all 2 x B x N patches.
    teacher_nets, student_nets = setup.teacher.networks, setup.students[""].networks
    temp = float(metrics["teacher_temp"])

    @jax.jit
    def ibot_by_hand(teacher, centers, student, crops):
        ibot = []
        for crop in crops:
            t = teacher_nets.backbone.apply({"params": teacher["backbone"]}, crop)
            t_logits = teacher_nets.dino_head.apply({"params": teacher["dino_head"]},
                                                    t["x_norm_patchtokens"])
            probs = losses.softmax_center(t_logits, centers["ibot"], temp)
            s = student_nets.backbone.apply({"params": student["backbone"]}, crop)
            s_logits = student_nets.dino_head.apply({"params": student["dino_head"]},
                                                    s["x_norm_patchtokens"])
            ibot.append(-jnp.sum(probs * jax.nn.log_softmax(s_logits / 0.1, axis=-1), axis=-1))
        return jnp.mean(jnp.stack(ibot))

    ibot = ibot_by_hand(saved["teacher"], saved["centers"], state0["student"],
                        batch["global_crops"])
    # fp32 sums over 25 x 16 patches and 1,024 prototypes: rounding ~1e-6 relative.
    np.testing.assert_allclose(metrics["ibot_loss"], float(ibot) / 2,
                               rtol=1e-5)

    momentum = float(metrics["momentum"])
    expected_ema = jax.tree.map(lambda e, s: momentum * e + (1 - momentum) * s,
                                state0["student_ema"], jax.device_get(state1["student"]))
    for a, b in zip(jax.tree.leaves(jax.device_get(state1["student_ema"])),
                    jax.tree.leaves(expected_ema)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # the same fp32 ops, reordered
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                         jax.device_get(state1["student"]), state0["student"]))
    assert max(moved) > 0


def test_a_backbone_only_teacher_is_distilled_by_its_features(teacher_dir, tmp_path):
    """Backbone weights (no heads: a weights dir here; hub files the same once read): the
    loss is the cosine distance of the student's projected cls tokens (global crops to their
    own view, local crops to both) and global-crop patch tokens to the teacher's, computed
    here by hand; a torch file needs distillation.teacher_arch, which must fit it."""
    workdir, saved = teacher_dir
    model, params = weights.load(workdir)
    backbone_dir = str(tmp_path / "backbone")
    weights.save(backbone_dir, model, params)
    before = snapshot(backbone_dir)
    config = distill_config(backbone_dir)
    configs.validate(config, 1)
    setup = distill.build(config, parallel.make_mesh(config.mesh))
    assert not setup.teacher.has_heads
    state0 = jax.device_get(setup.create_state())
    assert set(state0["student"]) == {"backbone", "feature_head"} and state0["centers"] == {}
    batch = random_batch(config, np.random.default_rng())
    state1, (metrics,) = run_steps(setup, [batch])
    student = setup.students[""]

    @jax.jit
    def by_hand(teacher, params, global_crops, local_crops):
        def unit(x):
            return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

        t = [model.apply({"params": teacher}, crop) for crop in global_crops]
        s_global = [student.networks.backbone.apply({"params": params["backbone"]}, crop)
                    for crop in global_crops]
        s_local = [student.networks.backbone.apply({"params": params["backbone"]}, crop)
                   for crop in local_crops]
        head = params["feature_head"]
        cls = lambda x: x["x_norm_clstoken"] @ head["cls"]["kernel"] + head["cls"]["bias"]
        patch = lambda x: (x["x_norm_patchtokens"] @ head["patch"]["kernel"]
                           + head["patch"]["bias"])
        cos = lambda a, b: jnp.sum(unit(a) * unit(b), axis=-1)
        cls_terms = [1 - cos(cls(s), t[i]["x_norm_clstoken"]) for i, s in enumerate(s_global)]
        cls_terms += [1 - cos(cls(s), ti["x_norm_clstoken"]) for s in s_local for ti in t]
        patch_terms = [1 - cos(patch(s), ti["x_norm_patchtokens"]) for s, ti in zip(s_global, t)]
        return jnp.mean(jnp.stack(cls_terms)), jnp.mean(jnp.stack(patch_terms))

    cls_loss, patch_loss = by_hand(params, state0["student"], batch["global_crops"],
                                   batch["local_crops"])
    # fp32 cosines of 32-wide features averaged over a few hundred rows: ~1e-6 relative.
    np.testing.assert_allclose(metrics["feature_cls_loss"], cls_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["feature_patch_loss"], patch_loss, rtol=1e-5)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(state1["student"])), jax.tree.leaves(state0["student"])))
    assert snapshot(backbone_dir) == before

    hub_file = str(tmp_path / "teacher.safetensors")
    weights.export(model, params, hub_file, "hub")
    with pytest.raises(ConfigError, match="distillation.teacher: .*distillation.teacher_arch"):
        distill.build(distill_config(hub_file), setup.mesh)
    config = distill_config(hub_file)
    config.distillation.teacher_arch = "vits14"
    with pytest.raises(ConfigError, match=r"distillation.teacher: .*shape mismatch at"):
        distill.build(config, setup.mesh)


def test_a_distillation_run_exports_its_ema_student(teacher_dir, tmp_path):
    """The main loop end to end: the start-up report names the teacher's memory and FLOPs,
    checkpoints hold student, student_ema and no teacher, and weights.load / convert of the
    workdir give the EMA student; the teacher workdir is never written."""
    workdir, _ = teacher_dir
    before = snapshot(workdir)
    config = distill_config(workdir)
    run = str(tmp_path / "distilled")
    loop.train(config, run)
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    start = {k: v for line in lines if line["step"] == 0 for k, v in line.items()}
    assert start["memory/teacher_bytes_per_device"] > start["memory/student_bytes_per_device"]
    assert start["flops/teacher"] > 0 and start["flops/student"] > 0
    paper = _memory_benchmark().state_bytes(config, 1, 1, teacher_lib.open_teacher(config).config)
    for name in ("teacher", "student", "opt_state", "student_ema"):
        assert paper[name] == start[f"memory/{name}_bytes_per_device"], name
    steps = checkpoint_lib.Checkpointer(run).steps()
    state = ocp.PyTreeCheckpointer().restore(os.path.join(run, "checkpoints", str(steps[-1]),
                                                          "state"))
    assert set(state) == {"step", "student", "opt_state", "student_ema", "centers"}
    model, params = weights.load(run)
    assert model.embed_dim == 16
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["student_ema"]["backbone"])):
        np.testing.assert_array_equal(a, b)
    _, student = weights.load(run, network="student")
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(student), jax.tree.leaves(params)))
    exported = str(tmp_path / "ema.safetensors")
    convert.main(["convert", f"--input={run}", f"--output={exported}", "--format=hub"])
    state_dict = weights.read_torch_file(exported)
    expected = weights.layouts(model).params_to_hub(model, params)
    assert set(state_dict) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(state_dict[key], value)
    with pytest.raises(ConfigError, match="its frozen teacher is not in its checkpoints"):
        weights.load(run, network="teacher")
    assert snapshot(workdir) == before


def test_teacher_errors_name_the_problem(teacher_dir, tmp_path):
    workdir, saved = teacher_dir
    mesh = parallel.make_mesh(tiny().mesh)

    def fails(config, message):
        with pytest.raises(ConfigError, match=message):
            configs.validate(config, 1)
            distill.build(config, mesh)

    fails(distill_config(str(tmp_path / "nothing_here")),
          r"distillation.teacher: .*nothing_here does not exist")
    (tmp_path / "empty").mkdir()
    fails(distill_config(str(tmp_path / "empty")), "holds no committed dinov2_jax checkpoint")
    # (A weights dir without heads is a feature-distillation teacher: see
    # test_a_backbone_only_teacher_is_distilled_by_its_features.)
    config = distill_config(workdir)
    config.distillation.teacher_arch = "vits14"
    fails(config, re.escape("distillation.teacher_arch=vits14 does not match") +
          r".*: blocks/attn/proj/bias: vits14 has \(12, 384\), the checkpoint has \(2, 32\)")
    config = distill_config(workdir)
    config.dino.head_n_prototypes = 512
    fails(config, "the teacher's dino.head_n_prototypes is 1024, this run's 512")
    config = distill_config(workdir, patch_size=4)
    fails(config, "the teacher's patch size 8 differs from student.patch_size=4")
    config = distill_config(workdir, drop_path_rate=0.1)
    fails(config, "student.drop_path_rate: 0.1: a distilled student trains without "
          "stochastic depth")
    config = tiny()
    config.distillation.students = {"a": {"depth": 1}}
    fails(config, "distillation.students: students need a teacher")
    config = distill_config(workdir)
    config.distillation.students = {"a": {"depht": 1}}
    fails(config, "distillation.students.a.depht: not a key of config.student")
    config.distillation.students = {"a": {"ffn_layer": "moe"}}
    fails(config, "distillation.students.a.ffn_layer: 'moe' is not one of")
    fails(configs.load("configs/demo.py:distill"), "set --config.distillation.teacher=WORKDIR")
    corrupt = tmp_path / "corrupt"
    save_run_state(tiny(), str(corrupt))
    for root, _, files in os.walk(corrupt / "checkpoints" / str(TEACHER_STEP) / "state"):
        for name in files:
            if name.endswith("_METADATA"):
                open(os.path.join(root, name), "w").write("{not json")
    fails(distill_config(str(corrupt)), "cannot read the checkpoint in")


@pytest.mark.slow
def test_two_students_in_one_step_equal_two_single_runs_and_are_faster(tmp_path):
    """Students `a` (16 wide) and `b` (24 wide, 1 block) of a demo-sized teacher (96 wide, 4
    blocks, as a ViT-g is to its students) trained together on the same batches as one run
    each: the same losses and parameters. Both programs do the same fp32 ops, but XLA fuses
    and orders reductions per program, so results agree to rounding (1e-5 relative: fp32
    epsilon 1.2e-7 times the few hundred terms of the largest sums). The multi-student step
    runs the teacher once for both, so its steady-state step time is below the two single
    steps' sum (median of 9 timed steps after compilation, the three programs in turns)."""
    workdir = str(tmp_path / "teacher")
    save_run_state(tiny(embed_dim=96, depth=4, num_heads=3), workdir)
    mesh = parallel.make_mesh(tiny().mesh)
    students = {"a": {"embed_dim": 16}, "b": {"embed_dim": 24, "depth": 1}}
    multi_config = distill_config(workdir)
    multi_config.train.batch_size = 16
    multi_config.distillation.students = students
    configs.validate(multi_config, 1)
    rng = np.random.default_rng()
    batches = [random_batch(multi_config, rng) for _ in range(2)]
    multi = distill.build(multi_config, mesh)
    multi_state, multi_history = run_steps(multi, batches)
    singles = {}
    for name in students:
        single_config = configs.distillation_student(multi_config, name)
        single = distill.build(single_config, mesh)
        state, history = run_steps(single, batches)
        singles[name] = (single, state)
        for step, (m, s) in enumerate(zip(multi_history, history)):
            for key in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss",
                        "ibot_loss", "koleo_loss"):
                np.testing.assert_allclose(m[f"{name}/{key}"], s[key], rtol=1e-5,
                                           err_msg=f"{name} step {step} {key}")
        for a, b in zip(jax.tree.leaves(jax.device_get(multi_state["students"][name])),
                        jax.tree.leaves(jax.device_get(
                            {k: state[k] for k in distill.SLOT_KEYS}))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # The FLOP count (MFU) has the teacher's forward once and each student's step.
    teacher_flops = multi.flops_by_network()["teacher"]
    assert multi.step_flops() == teacher_flops + sum(
        single.step_flops() - teacher_flops for single, _ in singles.values())

    def ready_step(setup):
        step, shardings = jitted_step(setup, batches[0])
        state = setup.create_state()
        batch = parallel.global_batch(batches[0], shardings)
        state, _ = step(state, batch)  # compiled, and one step run
        jax.block_until_ready(state)
        return [step, state, batch]

    # The three programs are timed in turns (multi, a, b, multi, ...), so that a change of the
    # machine's load during the measurement falls on all of them alike.
    programs = [ready_step(multi)] + [ready_step(single) for single, _ in singles.values()]
    times = [[] for _ in programs]
    for _ in range(9):
        for program, seconds in zip(programs, times):
            step, state, batch = program
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            seconds.append(time.perf_counter() - start)
            program[1] = state
    multi_time, *single_times = (float(np.median(seconds)) for seconds in times)
    ratio = multi_time / sum(single_times)
    print(f"multi-student step {multi_time * 1e3:.1f} ms, single steps "
          f"{[round(t * 1e3, 1) for t in single_times]} ms: ratio {ratio:.2f}")
    assert ratio < 1.0


@pytest.mark.slow
def test_distilled_recipes_smoke(tmp_path):
    """configs/vit{s,b,l}14_distilled.py:smoke and vit_family_distilled.py:smoke build against
    a vitg14:smoke teacher; the ViT-L one runs its steps through the command line."""
    teacher = str(tmp_path / "vitg14_smoke")
    save_run_state(configs.load("configs/vitg14.py:smoke"), teacher)
    mesh = parallel.make_mesh(tiny().mesh)
    family = configs.load("configs/vit_family_distilled.py:smoke")
    family.distillation.teacher = teacher
    configs.validate(family, 1)
    setup = distill.build(family, mesh)
    assert {name: s.networks.backbone.embed_dim for name, s in setup.students.items()} == {
        "vits14": 32, "vitb14": 48, "vitl14": 64}
    for recipe in ("vits14", "vitb14"):
        config = configs.load(f"configs/{recipe}_distilled.py:smoke")
        config.distillation.teacher = teacher
        configs.validate(config, 1)
        setup = distill.build(config, mesh)
        assert setup.teacher.networks.backbone.ffn_layer == "swiglu"
        assert setup.students[""].networks.backbone.drop_path_rate == 0.0
    workdir = str(tmp_path / "vitl14_distilled")
    result = subprocess.run(
        [sys.executable, "-m", "dinov2_jax.main", "--config=configs/vitl14_distilled.py:smoke",
         f"--workdir={workdir}", f"--config.distillation.teacher={teacher}",
         "--config.optim.epochs=1", "--config.optim.warmup_epochs=0",
         "--config.teacher.warmup_teacher_temp_epochs=0",
         "--config.optim.freeze_last_layer_epochs=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "frozen teacher:" in result.stdout
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses_ = [line["total_loss"] for line in lines if "total_loss" in line]
    assert len(losses_) == 3 and all(np.isfinite(losses_))


def _main(*args, timeout=2400):
    result = subprocess.run([sys.executable, "-m", "dinov2_jax.main", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _final_knn(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [line["knn/top1"] for line in lines if "knn/top1" in line][-1]


@pytest.mark.slow
def test_demo_distilled_student_beats_the_same_student_from_scratch(trained_demo, tmp_path):
    """`configs/demo.py:distill` from the README demo's workdir against `configs/demo.py:small`
    (the same smaller student, the demo's self-supervised recipe), the same 500 steps: the
    distilled EMA student's k-NN top-1 on demo:val is at least 3 points higher, with fewer
    parameters than the teacher. Measured on a 2-core machine: distilled 25.4, from scratch
    19.6, the teacher 22.8 (train.seed 1: 25.8 and 15.0); configs/demo.py says which settings
    make the difference and what else was tried."""
    before = snapshot(trained_demo.workdir)
    distilled, small = str(tmp_path / "distill"), str(tmp_path / "small")
    _main("--config=configs/demo.py:distill", f"--workdir={distilled}",
          f"--config.distillation.teacher={trained_demo.workdir}")
    _main("--config=configs/demo.py:small", f"--workdir={small}")
    assert snapshot(trained_demo.workdir) == before
    _, teacher = weights.load(trained_demo.workdir)
    _, student = weights.load(distilled)
    _, baseline = weights.load(small)
    assert count(student) == count(baseline) < count(teacher)
    distilled_top1, small_top1 = _final_knn(distilled), _final_knn(small)
    print(f"k-NN top-1 on demo:val: distilled {distilled_top1}, from scratch {small_top1}, "
          f"teacher {_final_knn(trained_demo.workdir)}")
    assert distilled_top1 >= small_top1 + 3


def count(params):
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def _memory_benchmark():
    spec = importlib.util.spec_from_file_location(
        "memory_benchmark", os.path.join(ROOT, "benchmarks", "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_benchmark_distillation_vitg14_teacher_vitl14_student_fits():
    """benchmarks/memory.py's distillation case on paper: with full FSDP each state row is the
    network's fp32 bytes split over the devices (plus at most its small replicated leaves),
    AdamW twice the student, the head logits cover every global-crop patch, and the total
    fits in 80 GB (256 x H100) and 95 GB (v5p-256) per device."""
    memory = _memory_benchmark()
    config = configs.load("configs/vitl14_distilled.py")
    teacher = teacher_lib.paper_teacher(configs.load("configs/vitg14.py"), config)
    setup = memory.abstract_setup(config, teacher_config=teacher.config)
    networks = setup.students[""].networks
    student = setup.abstract_state["student"]

    def bounds(tree, devices):
        leaves = jax.tree.leaves(tree)
        small = sum(leaf.size for leaf in leaves if leaf.size < config.mesh.min_shard_size)
        total = sum(leaf.size for leaf in leaves)
        return 4 * total / devices, 4 * (total / devices + small)

    for machine in memory.MACHINES:
        images, rows = memory.estimate(config, networks, setup.abstract_state, machine, 1,
                                       machine.devices, teacher)
        assert images == 3072 // machine.devices
        for name, tree, factor in (("teacher", teacher.abstract_params, 1),
                                   ("student", student, 1), ("student_ema", student, 1),
                                   ("gradients", student, 1), ("opt_state", student, 2)):
            low, high = bounds(tree, machine.devices)
            assert factor * low <= rows[name] <= factor * high + 64, (machine.name, name)
        patches = (224 // 14) ** 2
        student_rows = (2 + 8) * images + 2 * images * patches
        teacher_rows = 2 * images + 2 * images * patches
        assert rows["head logits"] == (3 * student_rows + teacher_rows) * 131072 * 4
        assert rows["teacher forward (transient)"] > 0
        assert sum(rows.values()) < machine.hbm_bytes, (machine.name, sum(rows.values()))
