"""dinov2_jax.parallel: mesh, FSDP rules, batch shardings, and training on 8 fake CPU devices.

The slow tests run `python -m dinov2_jax.main` in subprocesses (the fake device count is fixed
when jax starts) on the tiny demo config widened to embed_dim 128, so that the FSDP-sharded
leaves outweigh the small replicated ones. All runs share one persistent compilation cache.
"""
import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P
from ml_collections import ConfigDict

from dinov2_jax import configs, parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32 everywhere; the runs differ only in how XLA splits and orders reductions, which moves
# values by a few float32 ulps per step (observed: ~1e-7 relative).
TOLERANCE = 1e-5
# Two images per mask group: with one, KoLeo's nearest neighbour is the image itself and the
# loss is rounding noise. LayerScale 1.0 instead of the reference's 1e-5 init: with 1e-5 the
# attention gradients are so ill-conditioned in float32 that one device compiled at two XLA
# optimisation levels already disagrees by ~1e-2 on them (and AdamW's first steps turn such
# noise into +-lr updates); with 1.0 they agree to ~1e-6.
TINY = ["--config=configs/demo.py:tiny", "--config.student.embed_dim=128",
        "--config.student.layerscale=1.0", "--config.train.batch_size=16",
        "--config.train.mask_groups=8", "--config.train.log_every=1",
        "--config.train.checkpoint_every=3"]
# Compiling dominates these runs; LLVM's optimisations only cost time here.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _abstract_mesh(data, fsdp):
    return AbstractMesh((data, fsdp), parallel.BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


def _mesh_config(**kwargs):
    return ConfigDict({"data": -1, "fsdp": 1, "rules": [(".*", "fsdp")], "min_shard_size": 16,
                       **kwargs})


# ------------------------------------------------------------------ unit tests, in-process


@pytest.mark.parametrize("data, fsdp, devices, expected", [
    (-1, 1, 8, (8, 1)), (1, -1, 8, (1, 8)), (2, -1, 8, (2, 4)), (2, 4, 8, (2, 4))])
def test_mesh_shape_fills_the_rest(data, fsdp, devices, expected):
    assert parallel.mesh_shape(data, fsdp, devices) == expected


@pytest.mark.parametrize("data, fsdp, message", [
    (-1, -1, "at most one -1"), (3, -1, "does not divide"), (2, 2, "!= 8 devices")])
def test_mesh_shape_rejects_what_does_not_fit(data, fsdp, message):
    with pytest.raises(ValueError, match=message):
        parallel.mesh_shape(data, fsdp, 8)


def test_fsdp_spec_shards_the_largest_divisible_dim_and_keeps_small_leaves_whole():
    assert parallel.fsdp_spec((64, 256), 8, 16) == P(None, "fsdp")
    assert parallel.fsdp_spec((2, 64, 192), 8, 16) == P(None, None, "fsdp")
    assert parallel.fsdp_spec((12, 102), 4, 16) == P("fsdp", None)  # 102 % 4 != 0, 12 % 4 == 0
    assert parallel.fsdp_spec((7, 9), 4, 16) == P()                  # nothing divisible
    assert parallel.fsdp_spec((64,), 8, 128) == P()                   # under min_shard_size
    assert parallel.fsdp_spec((64, 256), 1, 16) == P()                # no fsdp axis


def test_state_shardings_follow_the_first_matching_rule():
    state = {"student": {"backbone": {"pos_embed": jax.ShapeDtypeStruct((1, 65, 64), "f4"),
                                      "blocks": {"qkv": jax.ShapeDtypeStruct((2, 64, 192), "f4")}},
                         "dino_head": {"kernel": jax.ShapeDtypeStruct((64, 256), "f4")}},
             "step": jax.ShapeDtypeStruct((), "i4")}
    rules = [("pos_embed", "replicate"), ("backbone/", "fsdp"), ("dino_head", "replicate")]
    shardings = parallel.state_shardings(state, _abstract_mesh(2, 4), _mesh_config(rules=rules))
    assert shardings["student"]["backbone"]["pos_embed"].spec == P()
    assert shardings["student"]["backbone"]["blocks"]["qkv"].spec == P(None, None, "fsdp")
    assert shardings["student"]["dino_head"]["kernel"].spec == P()
    assert shardings["step"].spec == P()  # no rule matches: replicated


def test_state_shardings_name_an_unknown_rule_kind():
    state = {"w": jax.ShapeDtypeStruct((64, 64), "f4")}
    with pytest.raises(ValueError, match="unknown kind 'tensor' for w"):
        parallel.state_shardings(state, _abstract_mesh(1, 8), _mesh_config(rules=[("w", "tensor")]))


def test_bytes_per_device_counts_shards():
    mesh = _abstract_mesh(2, 4)
    state = {"a": jax.ShapeDtypeStruct((64, 256), "f4"), "b": jax.ShapeDtypeStruct((3,), jax.numpy.bfloat16)}
    shardings = parallel.state_shardings(state, mesh, _mesh_config())
    tree = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                        state, shardings)
    assert parallel.bytes_per_device(tree) == 64 * 256 * 4 // 4 + 3 * 2


def test_batch_shardings_split_images_and_groups():
    batch = {"global_crops": np.zeros((2, 16, 4, 4, 3)), "masks": np.zeros((2, 16, 4), bool),
             "mask_indices": np.zeros((8, 5), np.int32), "masks_weight": np.zeros((8, 5))}
    shardings = parallel.batch_shardings(_abstract_mesh(2, 4), batch)
    assert shardings["global_crops"].spec == P(None, ("data", "fsdp"))
    assert shardings["masks"].spec == P(None, ("data", "fsdp"))
    assert shardings["mask_indices"].spec == P(("data", "fsdp"))
    odd = parallel.batch_shardings(_abstract_mesh(2, 4), {"mask_indices": np.zeros((4, 5))})
    assert odd["mask_indices"].spec == P()  # 4 groups on 8 devices: replicated


def _fake_devices(slices, per_slice):
    return [types.SimpleNamespace(id=i, slice_index=i // per_slice, process_index=i // per_slice,
                                  platform="cpu", device_kind="fake")
            for i in range(slices * per_slice)]


def test_device_grid_puts_slices_along_data():
    devices = _fake_devices(2, 4)
    grid = parallel.device_grid(ConfigDict({"data": 2, "fsdp": -1}), devices[::-1])
    assert grid.shape == (2, 4)
    assert [{d.slice_index for d in row} for row in grid] == [{0}, {1}]
    grid = parallel.device_grid(ConfigDict({"data": 4, "fsdp": 2}), devices)
    assert [{d.slice_index for d in row} for row in grid] == [{0}, {0}, {1}, {1}]
    with pytest.raises(ValueError, match="multiple of the 2 TPU slices"):
        parallel.device_grid(ConfigDict({"data": 1, "fsdp": 8}), devices)


# ------------------------------------------- losses: sharded (GSPMD and shard_map) = unsharded

LOSSES_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ml_collections import ConfigDict
    from dinov2_jax import losses, parallel

    mesh = parallel.make_mesh(ConfigDict({"data": 2, "fsdp": 4}))
    groups, per_group, upper, k, dim = 8, 3, 5, 32, 16
    batch = groups * per_group
    rng = np.random.default_rng()
    cls = rng.uniform(-1, 1, (2, batch, k)).astype(np.float32)
    patches = rng.uniform(-1, 1, (groups, upper, k)).astype(np.float32)
    valid = rng.random((groups, upper)) < 0.7
    valid[3] = False  # a group without masked patches
    features = rng.normal(size=(2, batch, dim)).astype(np.float32)
    center = rng.uniform(-0.1, 0.1, (k,)).astype(np.float32)

    def global_terms(cls, patches, valid, features):
        return {
            "dino_center": losses.update_center(center, cls.reshape(-1, k)),
            "ibot_center": losses.update_center(center, patches, valid=valid),
            "dino_sinkhorn": losses.sinkhorn_knopp(cls, 0.07),
            "ibot_sinkhorn": losses.sinkhorn_knopp(patches, 0.07, valid=valid),
            "koleo": jnp.sum(jnp.mean(losses.koleo_loss(
                features.reshape(2, groups, per_group, dim)), axis=1)),
        }

    def per_device_terms(cls, patches, valid, features):
        axes = ("data", "fsdp")
        koleo = jnp.sum(losses.koleo_loss(features), axis=0)  # this device = one group
        return {
            "dino_center": losses.update_center(center, cls.reshape(-1, k), axis_name=axes),
            "ibot_center": losses.update_center(center, patches, valid=valid, axis_name=axes),
            "dino_sinkhorn": losses.sinkhorn_knopp(cls, 0.07, axis_name=axes),
            "ibot_sinkhorn": losses.sinkhorn_knopp(patches, 0.07, valid=valid, axis_name=axes),
            "koleo": jax.lax.pmean(koleo, axes),
        }

    inputs = (cls, patches, valid, features)
    specs = (P(None, ("data", "fsdp")), P(("data", "fsdp")), P(("data", "fsdp")),
             P(None, ("data", "fsdp")))
    unsharded = jax.jit(global_terms)(*inputs)
    sharded_inputs = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(inputs, specs)]
    gspmd = jax.jit(global_terms)(*sharded_inputs)
    out_specs = {"dino_center": P(), "ibot_center": P(), "dino_sinkhorn": specs[0],
                 "ibot_sinkhorn": specs[1], "koleo": P()}
    explicit = jax.jit(jax.shard_map(per_device_terms, mesh=mesh, in_specs=specs,
                                     out_specs=out_specs))(*sharded_inputs)
    assert gspmd["dino_sinkhorn"].sharding.spec == specs[0], gspmd["dino_sinkhorn"].sharding
    errors = {name: [float(np.abs(np.asarray(other[name]) - np.asarray(unsharded[name])).max()
                           / np.abs(np.asarray(unsharded[name])).max())
                     for other in (gspmd, explicit)] for name in unsharded}
    print("ERRORS", json.dumps(errors))
""")


def test_loss_reductions_sharded_equal_unsharded():
    """Centers, Sinkhorn-Knopp sums and per-group KoLeo as step.py computes them on global
    arrays, with the batch split over 8 devices (GSPMD), equal the unsharded values and the
    explicit per-device (shard_map + psum, the reference's per-rank) computation."""
    result = _python(LOSSES_SCRIPT, devices=8)
    errors = json.loads(result.stdout.split("ERRORS", 1)[1])
    for name, (gspmd, explicit) in errors.items():
        assert gspmd < TOLERANCE and explicit < TOLERANCE, (name, gspmd, explicit)


# ------------------------------------------------------- training runs on 8 fake devices


def _python(script, devices, env=None):
    env = {**os.environ, **(env or {}), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _start(workdir, devices, cache, *flags):
    """`python -m dinov2_jax.main` on `devices` fake CPU devices, in the background; its
    output goes to WORKDIR.log."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
           "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    with open(f"{workdir}.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "dinov2_jax.main", f"--workdir={workdir}",
                                 *TINY, *flags], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def _wait(*processes):
    """Waits for all; on a failure or timeout stops the rest and shows the failed log."""
    try:
        for process in processes:
            if process.wait(timeout=900) != 0:
                workdir = next(a for a in process.args if a.startswith("--workdir="))[10:]
                with open(f"{workdir}.log") as log:
                    pytest.fail(f"{' '.join(process.args)} failed:\n{log.read()[-4000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def read_metrics(workdir):
    """{step: values} of metrics.jsonl; the start-up memory report is at step 0."""
    lines = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            values = json.loads(line)
            lines.setdefault(values.pop("step"), {}).update(values)
    return lines


def read_losses(workdir):
    return {step: {k: v for k, v in values.items() if k.endswith("loss")}
            for step, values in read_metrics(workdir).items() if step > 0}


def read_state(workdir, step):
    """The saved train state of a step as numpy arrays (no devices involved)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def max_relative_error(tree, reference):
    """max |a - b| / max(|b|, 1) over all leaves (params are O(0.01..1), losses O(1..10))."""
    errors = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b)
                                                    / np.maximum(np.abs(b), 1.0), initial=0.0)),
                          tree, reference)
    return max(jax.tree.leaves(errors))


def resume_copy(workdir, step, new_workdir):
    """A fresh workdir holding only `step`'s checkpoint of `workdir`."""
    shutil.copytree(os.path.join(workdir, "checkpoints", str(step)),
                    os.path.join(new_workdir, "checkpoints", str(step)))
    return new_workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs from scratch, side by side: fsdp=8 (6 steps, checkpoints at 3 and 6; the run
    the others must equal), data=8 and one device (3 steps each)."""
    root = tmp_path_factory.mktemp("parallel")
    cache = root / "compilation_cache"
    workdirs = {"fsdp8": root / "fsdp8", "data8": root / "data8", "single": root / "single"}
    _wait(_start(workdirs["fsdp8"], 8, cache, "--config.mesh.data=1", "--config.mesh.fsdp=8",
                 "--config.train.total_steps=6"),
          _start(workdirs["data8"], 8, cache, "--config.mesh.data=8", "--config.mesh.fsdp=1",
                 "--config.train.total_steps=3"),
          _start(workdirs["single"], 1, cache, "--config.train.total_steps=3"))
    return root, cache, workdirs


@pytest.mark.slow
def test_fsdp_data_parallel_and_one_device_train_alike(runs):
    _, _, workdirs = runs
    reference_losses = {step: v for step, v in read_losses(workdirs["fsdp8"]).items() if step <= 3}
    reference_state = read_state(workdirs["fsdp8"], 3)
    for name in ("data8", "single"):
        assert read_losses(workdirs[name]).keys() == reference_losses.keys() == {1, 2, 3}
        assert max_relative_error(read_losses(workdirs[name]), reference_losses) < TOLERANCE
        assert max_relative_error(read_state(workdirs[name], 3), reference_state) < TOLERANCE


@pytest.mark.slow
def test_fsdp_params_and_optimizer_take_an_eighth_of_the_memory(runs):
    """Read from the start-up memory report in metrics.jsonl."""
    _, _, workdirs = runs
    memory_fsdp, memory_data = read_metrics(workdirs["fsdp8"])[0], read_metrics(workdirs["data8"])[0]
    params_and_optimizer = ("memory/student_bytes_per_device",
                            "memory/opt_state_bytes_per_device")
    sharded = sum(memory_fsdp[k] for k in params_and_optimizer)
    replicated = sum(memory_data[k] for k in params_and_optimizer)
    assert sharded * 6 <= replicated, (sharded, replicated)
    teacher = "memory/teacher_bytes_per_device"
    assert memory_fsdp[teacher] * 6 <= memory_data[teacher]


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_other_meshes(runs):
    """Step 3 of the fsdp=8 run, restored onto data=2 x fsdp=4 and onto one device, trains on
    to what the fsdp=8 run reached at step 6 (state, data iterator and all)."""
    root, cache, workdirs = runs
    fsdp8 = workdirs["fsdp8"]
    meshes = {"resume_2x4": (8, ["--config.mesh.data=2", "--config.mesh.fsdp=4"]),
              "resume_single": (1, [])}
    resumed = {name: resume_copy(fsdp8, 3, root / name) for name in meshes}
    _wait(*[_start(resumed[name], devices, cache, *flags, "--config.train.total_steps=6")
            for name, (devices, flags) in meshes.items()])

    reference_losses = {step: v for step, v in read_losses(fsdp8).items() if step > 3}
    reference_state = read_state(fsdp8, 6)
    for workdir in resumed.values():
        assert read_losses(workdir).keys() == {4, 5, 6}
        assert max_relative_error(read_losses(workdir), reference_losses) < TOLERANCE
        assert max_relative_error(read_state(workdir, 6), reference_state) < TOLERANCE


# ------------------------------------------------------------------ benchmarks/memory.py


def _memory_benchmark():
    spec = importlib.util.spec_from_file_location(
        "memory_benchmark", os.path.join(REPO, "benchmarks", "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_from_flags(flags):
    """The config that `main` builds from --config=... and --config.a.b=value flags."""
    config = configs.load(flags[0].split("=", 1)[1])
    for flag in flags[1:]:
        path, value = flag.removeprefix("--config.").split("=", 1)
        section, key = path.split(".")
        config[section][key] = ast.literal_eval(value)
    return config


@pytest.mark.slow
def test_memory_benchmark_equals_the_start_up_report(runs):
    """The on-paper state bytes (eval_shape + the sharding rules on an abstract mesh) are
    exactly what the fsdp=8 and data=8 runs allocated and reported."""
    _, _, workdirs = runs
    memory = _memory_benchmark()
    config = _config_from_flags(TINY)
    for name, (data, fsdp) in {"fsdp8": (1, 8), "data8": (8, 1)}.items():
        paper = memory.state_bytes(config, data, fsdp)
        reported = read_metrics(workdirs[name])[0]
        for part in ("student", "teacher", "opt_state"):
            assert paper[part] == reported[f"memory/{part}_bytes_per_device"], (name, part)


def test_memory_benchmark_prints_the_vitg14_tables():
    result = subprocess.run([sys.executable, "benchmarks/memory.py"], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("vit_giant2/14: 1.235B student params")
    assert "256 x H100 (32 nodes x 8): 12 images per device" in out
    assert "v5p-256 (128 chips): 24 images per device" in out
    tables = [[line for line in block.splitlines() if line.startswith("| ")]
              for block in out.split("\n\n")[1:]]
    assert len(tables) == 2
    for table, devices in zip(tables, (256, 128)):
        rows = {cells[0]: [float(v.rstrip("%")) for v in cells[1:]]
                for cells in ([c.strip() for c in line.strip("|").split("|")]
                              for line in table[1:])}
        full_fsdp, _, replicated = rows["student"]
        # Everything but the small leaves is sharded: within 1% of a perfect 1/devices split
        # (the table rounds to 0.1 MB).
        assert abs(full_fsdp - replicated / devices) <= 0.01 * replicated / devices + 1e-4
        assert rows["total"][0] < rows["total"][1] < rows["total"][2]
        assert rows["share of HBM"][0] < 15  # ViT-g fits easily with full FSDP
