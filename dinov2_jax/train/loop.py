"""The training loop: mesh, data, state, steps, logs, checkpoints, evals, preemption.

Read top to bottom: validate the config, build the mesh, the data and the (born sharded)
state, resume from `workdir` when it holds a checkpoint, then run jitted steps. Every step's
metrics are checked one step later (so dispatch is not blocked) and a NaN/Inf stops the run
before it can be checkpointed. SIGTERM saves and returns cleanly.
"""
import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import parameter_overview

from dinov2_jax import configs, convert, flops, parallel
from dinov2_jax.data import pipeline
from dinov2_jax.train import checkpoint as checkpoint_lib
from dinov2_jax.train import metrics as metrics_lib
from dinov2_jax.train import optim, schedules as schedules_lib
from dinov2_jax.train import state as state_lib
from dinov2_jax.train import step as step_lib

# Keys that may change between a run and its resume; anything else must match.
RESUMABLE_CHANGES = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.num_workers", "evaluation.", "mesh.", "peak_flops")


class DivergenceError(RuntimeError):
    """A NaN or Inf loss or gradient."""


class _Preemption:
    """Sets a flag on SIGTERM; the loop saves and returns at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _check_resumable(saved_config_json, config):
    saved = json.loads(configs.from_json(saved_config_json).to_json())
    current = json.loads(config.to_json())

    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                       else {prefix + key: value})
        return out

    saved, current = flat(saved), flat(current)
    for key in sorted(set(saved) | set(current)):
        if key.startswith(RESUMABLE_CHANGES) or saved.get(key) == current.get(key):
            continue
        raise ValueError(f"config error at {key}: the checkpoint in the workdir was made with "
                         f"{saved.get(key)!r}, this run has {current.get(key)!r}; use a new "
                         f"--workdir or the same config")


def _pretrained_student(networks, config, rng):
    """The student with its backbone from student.pretrained_weights (strict), heads fresh."""
    student = state_lib.init_student(networks, config, rng)
    _, backbone = convert.load_weights(config.student.pretrained_weights)
    expected = jax.tree.map(np.shape, student["backbone"])
    got = jax.tree.map(np.shape, backbone)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError(f"student.pretrained_weights={config.student.pretrained_weights} does "
                         f"not match student.arch: {_first_difference(expected, got)}")
    return {**student, "backbone": jax.tree.map(jnp.asarray, backbone)}


def _first_difference(expected, got):
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    for path in sorted(set(flat_expected) | set(flat_got), key=str):
        if flat_expected.get(path) != flat_got.get(path):
            return (f"{jax.tree_util.keystr(path)}: expected {flat_expected.get(path)}, "
                    f"got {flat_got.get(path)}")
    return "tree structures differ"


def _memory_report(state, writer):
    report = {f"memory/{name}_bytes_per_device": parallel.bytes_per_device(state[name])
              for name in ("student", "teacher", "opt_state")}
    writer.write(0, report)
    writer.console("per-device memory: " + ", ".join(
        f"{name.split('/')[1].removesuffix('_bytes_per_device')} {value / 2**20:.1f} MiB"
        for name, value in report.items()))
    return report


def _knn(networks, config, teacher, writer, step):
    from dinov2_jax.eval import extract, knn
    evaluation = config.evaluation
    model = networks.backbone.clone(drop_path_rate=0.0)
    size = config.crops.global_crops_size
    results = knn.knn_eval(model, teacher["backbone"], evaluation.knn_train, evaluation.knn_val,
                           image_size=size,
                           resize_size=extract.default_resize_size(size, evaluation.knn_resize),
                           batch_size=evaluation.batch_size)
    writer.write(step, results)
    writer.console(f"step {step} k-NN: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


def train(config, workdir):
    """Trains `config` in `workdir`, resuming from its newest checkpoint; returns final metrics."""
    configs.validate(config, jax.device_count(), jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    writer = metrics_lib.MetricWriter(workdir)
    total_steps = configs.total_steps(config)

    mesh = parallel.make_mesh(config.mesh)
    networks = state_lib.build_networks(config)
    schedules = schedules_lib.make_schedules(config)
    rng = jax.random.PRNGKey(config.train.seed)
    abstract_student = jax.eval_shape(functools.partial(state_lib.init_student, networks, config),
                                      rng)
    optimizer = optim.make_optimizer(config, abstract_student, schedules)
    init_student = (functools.partial(_pretrained_student, networks, config)
                    if config.student.pretrained_weights
                    else functools.partial(state_lib.init_student, networks, config))

    def init_state(rng):
        return state_lib.create_train_state(networks, config, optimizer, rng, init_student(rng))

    abstract_state = jax.eval_shape(init_state, rng)
    state_shardings = parallel.state_shardings(abstract_state, mesh, config.mesh)

    mask_groups = config.train.mask_groups or jax.local_device_count()
    data_iter = pipeline.make_train_iterator(config, mask_groups=mask_groups)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    restored = checkpointer.restore_latest(
        jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                     abstract_state, state_shardings), data_iter)
    if restored is not None:
        state, meta = restored
        _check_resumable(meta["config"], config)
        writer.console(f"resumed from step {int(state['step'])} in {checkpointer.directory}")
    else:
        state = jax.jit(init_state, out_shardings=state_shardings)(rng)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json(indent=1))
    writer.console("student parameters:\n" + parameter_overview.get_parameter_overview(
        state["student"], include_stats=False))
    _memory_report(state, writer)

    first = next(data_iter)
    batch_shardings = parallel.batch_shardings(mesh, {k: v for k, v in first.items()
                                                      if k != pipeline.BAD_KEY})
    train_step = jax.jit(step_lib.make_train_step(networks, config, optimizer, schedules),
                         in_shardings=(state_shardings, batch_shardings),
                         out_shardings=(state_shardings, None), donate_argnums=0)
    step_flops = flops.train_step_flops(networks, config, config.train.batch_size,
                                        first["mask_indices"].size * jax.process_count())
    peak = flops.peak_flops_per_device(override=config.peak_flops)

    def save(step_number):
        meta = {"config": config.to_json(), "step": step_number, "wall_time": time.time(),
                "process_count": jax.process_count()}
        checkpointer.save(step_number, state, data_iter, meta)

    preemption = _Preemption()
    step = int(state["step"])
    history, pending, batch, final = [], None, first, {}
    interval_start, interval_steps = time.time(), 0
    if step == 0 and config.evaluation.knn_train and config.evaluation.at_start:
        final.update(_knn(networks, config, state["teacher"], writer, 0))
    try:
        while step < total_steps:
            bad = batch.pop(pipeline.BAD_KEY, [])
            for key, reason in bad[:3]:
                logging.warning("skipped bad record %s: %s", key, reason)
            state, step_metrics = train_step(state, parallel.global_batch(batch, batch_shardings))
            step += 1
            interval_steps += 1
            if pending is not None:
                history.append(_checked(*pending))
            pending = (step, step_metrics)
            is_last = step == total_steps
            if step % config.train.log_every == 0 or is_last:
                history.append(_checked(*pending))
                pending = None
                elapsed = time.time() - interval_start
                values = metrics_lib.mean_metrics(history)
                values["img_per_sec"] = interval_steps * config.train.batch_size / elapsed
                values["mfu"] = (step_flops * interval_steps / elapsed / jax.device_count() / peak
                                 if peak else None)
                values.update({f"data/{k}": v for k, v in
                               pipeline.bad_record_stats(data_iter).items()})
                writer.write(step, values)
                writer.console(metrics_lib.format_line(step, total_steps, values,
                                                       elapsed / interval_steps))
                final.update(values)
                history, interval_start, interval_steps = [], time.time(), 0
            if step % config.train.checkpoint_every == 0 or is_last or preemption.requested:
                if pending is not None:
                    history.append(_checked(*pending))
                    pending = None
                save(step)
            if preemption.requested:
                checkpointer.wait()
                writer.console(f"preempted: saved step {step}; rerun the same command to resume")
                return final
            every = config.evaluation.every
            if config.evaluation.knn_train and (is_last or (every and step % every == 0)):
                final.update(_knn(networks, config, state["teacher"], writer, step))
            if not is_last:
                batch = next(data_iter)
    finally:
        preemption.restore()
        checkpointer.close()
    writer.console(f"finished step {step}/{total_steps}; the teacher exports to PyTorch with: "
                   f"python -m dinov2_jax.convert --input {workdir} --output teacher.pth "
                   "--format hub")
    return final


def _checked(step, step_metrics):
    """Host values of a step's metrics; DivergenceError if any is NaN or Inf."""
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    if not all(np.isfinite(v) for v in values.values()):
        bad = {k: v for k, v in values.items() if not np.isfinite(v)}
        losses = {k: v for k, v in values.items() if "loss" in k}
        raise DivergenceError(f"non-finite values at step {step}: {bad}; losses {losses}. The "
                              f"run stops here; the last good checkpoint is kept")
    return values
