"""The training loop: data, state, steps, logs, checkpoints, evaluations, preemption.

Read top to bottom: validate the config, build the run (`train/setup.py`) and its data,
resume from `workdir` when it holds a checkpoint whose config matches, then run jitted steps.
Every step's metrics are checked one step later (so dispatch is not blocked) and a NaN/Inf
stops the run before it can be checkpointed. SIGTERM saves and returns cleanly, at the same
step on every host. Evaluations come in as a callback, so this module knows no eval code.
"""
import signal
import time

import jax
import numpy as np
from absl import logging
from clu import parameter_overview
from etils import epath
from jax.experimental import multihost_utils

from dinov2_jax import configs, flops, parallel, profiling
from dinov2_jax.data import pipeline, sources
from dinov2_jax.train import checkpoint as checkpoint_lib
from dinov2_jax.train import distill
from dinov2_jax.train import metrics as metrics_lib
from dinov2_jax.train import setup as setup_lib

# Keys that may change between a run and its resume; anything else must match.
RESUMABLE_CHANGES = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.num_workers", "train.collapse_", "train.stop_on_collapse",
                     "evaluation.", "mesh.", "peak_flops", "profile_steps")


class DivergenceError(RuntimeError):
    """A NaN or Inf loss or gradient."""


class CollapseError(RuntimeError):
    """A head's teacher stayed collapsed (train.stop_on_collapse)."""


def train(config, workdir, evaluate=None):
    """Trains `config` in `workdir` (local or gs://), resuming from its newest checkpoint.

    `evaluate(model, backbone_params) -> {name: float}` runs on the run's final model (the
    EMA teacher; a distillation's EMA student, each student's results prefixed `NAME/`) at
    step 0 when evaluation.at_start, every evaluation.every steps and at the end. Returns the
    last interval's metrics and the last evaluation's results. A config with
    `distillation.teacher` builds through `train/distill.py` instead of `train/setup.py`.
    """
    configs.validate(config, jax.device_count(), jax.process_count())
    workdir = epath.Path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    writer = metrics_lib.MetricWriter(workdir)
    build = distill.build if config.distillation.teacher else setup_lib.build
    setup = build(config, parallel.make_mesh(config.mesh))
    source = sources.open_source(config.train.dataset, config.train.skip_bad_shards)
    data_iter = pipeline.make_train_iterator(
        config, mask_groups=config.train.mask_groups or jax.local_device_count(), source=source)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    state = _restore_or_create(setup, checkpointer, data_iter, workdir, writer)
    if getattr(source, "skipped_shards", None):
        writer.write(int(state["step"]), {"data/skipped_shards": len(source.skipped_shards),
                                          "data/skipped_shard_records": source.skipped_records})
    for name, tree in setup.parameter_trees(state).items():
        writer.console(f"{name} parameters:\n" + parameter_overview.get_parameter_overview(
            tree, include_stats=False))
    _memory_report(setup.memory_trees(state), writer)
    if config.distillation.teacher:
        _teacher_report(setup, writer)

    batch = next(data_iter)
    batch_shardings = parallel.batch_shardings(setup.mesh, {k: v for k, v in batch.items()
                                                            if k != pipeline.BAD_KEY})
    train_step = setup.train_step(batch_shardings)
    total_steps = configs.total_steps(config)
    interval = _Interval(writer, total_steps, config.train.batch_size, data_iter,
                         setup.step_flops(batch["mask_indices"].size * jax.process_count()),
                         config.peak_flops, _CollapseWatch(config.train))
    every = config.evaluation.every
    preemption = _Preemption()
    profiler = profiling.StepProfiler(config.profile_steps, workdir / "profile")
    step, final = int(state["step"]), {}
    if step == 0 and evaluate and config.evaluation.at_start:
        final.update(_evaluate(evaluate, setup, state, writer, 0))
    try:
        while step < total_steps:
            for key, reason in batch.pop(pipeline.BAD_KEY, [])[:3]:
                logging.warning("skipped bad record %s: %s", key, reason)
            state, step_metrics = train_step(state, parallel.global_batch(batch, batch_shardings))
            step += 1
            profiler.after_step(step, step_metrics)
            interval.add(step, step_metrics)
            is_last = step == total_steps
            if step % config.train.log_every == 0 or is_last:
                final.update(interval.flush(step))
            stop = preemption.requested(step)
            if step % config.train.checkpoint_every == 0 or is_last or stop:
                interval.settle()
                checkpointer.save(step, state, data_iter, {
                    "config": config.to_json(), "step": step, "wall_time": time.time(),
                    "process_count": jax.process_count()})
            if stop:
                checkpointer.wait()
                writer.console(f"preempted: saved step {step}; rerun the same command to resume")
                return final
            if evaluate and (is_last or (every and step % every == 0)):
                final.update(_evaluate(evaluate, setup, state, writer, step))
            if not is_last:
                batch = next(data_iter)
    finally:
        preemption.restore()
        if profiler.close() is not None:
            writer.console(f"profile of steps {profiler.summary['steps']}: {profiler.directory}")
        writer.close()
        checkpointer.close()
    final_model = "the EMA student" if config.distillation.teacher else "the teacher"
    student = " --student=NAME" if config.distillation.students else ""
    writer.console(f"finished step {step}/{total_steps}; {final_model} exports to PyTorch with: "
                   f"python -m dinov2_jax.convert --input {workdir}{student} --output "
                   "model.pth --format hub")
    return final


def _restore_or_create(setup, checkpointer, data_iter, workdir, writer):
    """The newest checkpoint's state when its config matches this one, else a fresh state.

    The saved config is compared before any state is read: a mismatch raises ConfigError and
    leaves the workdir as it is. `config.json` is written only for a fresh run.
    """
    config = setup.config
    restored = checkpointer.restore_latest(
        setup.abstract_state, data_iter, lambda meta: _check_resumable(meta["config"], config))
    if restored is not None:
        state, _ = restored
        writer.console(f"resumed from step {int(state['step'])} in {checkpointer.directory}")
        return state
    state = setup.create_state()
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json(indent=1))
    return state


def _check_resumable(saved_config_json, config):
    difference = configs.first_difference(configs.from_json(saved_config_json), config,
                                          ignore=RESUMABLE_CHANGES)
    if difference:
        key, saved, current = difference
        raise configs.ConfigError(
            f"config error at {key}: the checkpoints in the workdir were made with {saved!r}, "
            f"this run has {current!r}; use a new --workdir or the same config (nothing in the "
            "workdir was changed)")


def _memory_report(trees, writer):
    report = {f"memory/{name}_bytes_per_device": parallel.bytes_per_device(tree)
              for name, tree in trees.items()}
    writer.write(0, report)
    writer.console("per-device memory: " + ", ".join(
        f"{name.removeprefix('memory/').removesuffix('_bytes_per_device')} "
        f"{value / 2**20:.1f} MiB" for name, value in report.items()))
    return report


def _teacher_report(setup, writer):
    """The frozen teacher: source, size, sharding, and the step's FLOPs per network."""
    teacher = setup.teacher
    leaves = jax.tree.leaves(setup.abstract_teacher)
    sharded = sum(1 for leaf in leaves if not leaf.sharding.is_fully_replicated)
    by_network = setup.flops_by_network()
    writer.write(0, {f"flops/{name}": value for name, value in by_network.items()})
    writer.console(
        f"frozen teacher: {teacher.source}"
        + (f" step {teacher.step}, " if teacher.has_heads else ", ")
        + f"{sum(leaf.size for leaf in leaves):,} parameters ("
        + ("backbone and heads" if teacher.has_heads else "backbone only: feature distillation")
        + f"), "
        f"{sharded} of {len(leaves)} leaves sharded over mesh {dict(setup.mesh.shape)}; "
        "GFLOP per step: " + ", ".join(f"{name} {value / 1e9:.3g}"
                                       for name, value in by_network.items())
        + " (teacher: forward once; students: forward + backward)")


def _evaluate(evaluate, setup, state, writer, step):
    results = {}
    for prefix, (model, params) in setup.final_models(state).items():
        results.update({prefix + key: value for key, value in evaluate(model, params).items()})
    writer.write(step, results)
    writer.console(f"step {step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return results


class _Preemption:
    """Decides when a preempted run saves and stops: at the same step on every host.

    One process: a SIGTERM handler sets a flag. Several processes: the preemption sync manager
    that `jax.distributed.initialize` starts catches SIGTERM on any host and the hosts agree
    on a step; `reached_preemption_sync_point` is True on all of them at that step.
    """

    def __init__(self):
        self._flag = False
        self._multihost = jax.process_count() > 1
        self._previous = (None if self._multihost
                          else signal.signal(signal.SIGTERM, self._handle))

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self._flag = True

    def requested(self, step):
        if self._multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def restore(self):
        if not self._multihost:
            signal.signal(signal.SIGTERM, self._previous)


class _Interval:
    """One log interval's bookkeeping: each step's metrics are read and checked for NaN/Inf
    one step late (so dispatch never waits for them); `flush` logs their means as one line."""

    def __init__(self, writer, total_steps, batch_size, data_iter, step_flops, peak_flops,
                 collapse):
        self._writer, self._total, self._batch_size = writer, total_steps, batch_size
        self._data_iter, self._step_flops, self._collapse = data_iter, step_flops, collapse
        self._peak = flops.peak_flops_per_device(override=peak_flops)
        self._history, self._pending = [], None
        self._start, self._steps = time.time(), 0

    def add(self, step, step_metrics):
        self.settle()
        self._pending = (step, step_metrics)
        self._steps += 1

    def settle(self):
        """Reads and checks the pending step's metrics (DivergenceError on NaN/Inf)."""
        if self._pending is not None:
            self._history.append(_checked(*self._pending))
            self._pending = None

    def flush(self, step):
        self.settle()
        elapsed = time.time() - self._start
        values = metrics_lib.mean_metrics(self._history)
        values["img_per_sec"] = self._steps * self._batch_size / elapsed
        values["mfu"] = (self._step_flops * self._steps / elapsed / jax.device_count()
                         / self._peak if self._peak else None)
        values.update({f"data/{k}": v for k, v in
                       pipeline.bad_record_stats(self._data_iter).items()})
        self._writer.write(step, values)
        self._writer.console(metrics_lib.format_line(step, self._total, values,
                                                     elapsed / self._steps))
        self._history, self._start, self._steps = [], time.time(), 0
        self._collapse.check(step, values)
        return values


class _CollapseWatch:
    """The two classic DINO failures, per head, from each log interval's teacher entropies:
    uniform targets (per-image entropy near log K) and one-prototype targets (batch-mean
    entropy near 0). Warns once a head stays collapsed for `collapse_intervals` intervals in
    a row; with `stop_on_collapse` raises CollapseError (the last checkpoint stays)."""

    def __init__(self, train):
        self._train, self._streaks = train, {}

    def check(self, step, values):
        if not self._train.collapse_intervals or "dino/entropy" not in values:
            return  # off, or a feature-distillation run (its teacher has no heads)
        for head in ("dino", "ibot"):
            entropy, batch = values[f"{head}/entropy"], values[f"{head}/batch_entropy"]
            kind = ("uniform" if entropy >= self._train.collapse_uniform else
                    "one-prototype" if batch <= self._train.collapse_one_prototype else None)
            streak = self._streaks.get(head, (None, 0))
            self._streaks[head] = (kind, streak[1] + 1 if kind and kind == streak[0] else
                                   int(kind is not None))
            if kind and self._streaks[head][1] == self._train.collapse_intervals:
                message = (f"the {head} head's teacher has been collapsed ({kind}) for "
                           f"{self._train.collapse_intervals} log intervals at step {step}: "
                           f"per-image entropy {entropy:.3f} log K, batch-mean entropy "
                           f"{batch:.3f} log K")
                if self._train.stop_on_collapse:
                    raise CollapseError(message + "; train.stop_on_collapse stops the run, the "
                                        "last checkpoint is kept")
                logging.warning("%s (train.stop_on_collapse=True would stop the run)", message)


def _checked(step, step_metrics):
    """Host values of a step's metrics; DivergenceError if any is NaN or Inf."""
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    if not all(np.isfinite(v) for v in values.values()):
        bad = {k: v for k, v in values.items() if not np.isfinite(v)}
        losses = {k: v for k, v in values.items() if "loss" in k}
        raise DivergenceError(f"non-finite values at step {step}: {bad}; losses {losses}. The "
                              f"run stops here; the last good checkpoint is kept")
    return values
