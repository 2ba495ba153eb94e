"""Checkpoints of a run: orbax CheckpointManager over `state`, the Grain iterator and `meta`.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when
complete), the last `keep` are kept, and a restore takes the target's shardings, so a run can
resume on another mesh or device count. A checkpoint that cannot be read (cut off mid-write,
truncated on disk) is skipped with a warning in favour of the one before it.
"""
import os
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


def _manager(directory, keep=None, async_save=True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
    """Saves and restores {state, data_iter, meta} under `workdir/checkpoints`."""

    def __init__(self, workdir, keep=3):
        self.directory = os.path.join(workdir, "checkpoints")
        self._manager = _manager(self.directory, keep)

    def save(self, step, state, data_iter, meta):
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self):
        self._manager.wait_until_finished()

    def steps(self):
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state, data_iter):
        """(state, meta) of the newest readable checkpoint, or None when there is none."""
        for step in reversed(self.steps()):
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                args = {"state": ocp.args.StandardRestore(abstract_state),
                        "meta": ocp.args.JsonRestore()}
                if data_iter is not None and meta.get("process_count") == jax.process_count():
                    args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
                elif data_iter is not None:
                    logging.warning("checkpoint at step %d was written by %s processes, this run "
                                    "has %d: the state resumes, the data order starts afresh",
                                    step, meta.get("process_count"), jax.process_count())
                restored = self._manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped
                self._set_aside(step, error)
                continue
            return restored["state"], restored["meta"]
        return None

    def _set_aside(self, step, error):
        """Moves an unreadable step out of the manager's way, keeping it for inspection."""
        aside = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, f"{step}-{int(time.time())}")
        logging.warning("checkpoint at step %d is unreadable (%s: %s); moved it to %s and "
                        "trying the one before it", step, type(error).__name__, str(error)[:300],
                        target)
        if jax.process_index() == 0:
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.reload()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def load_backbone(path, network="teacher"):
    """(model, backbone params) of the teacher or student of a workdir or one of its steps.

    `path` is a workdir (newest step), its `checkpoints` dir, or a `checkpoints/<step>` dir.
    Only that network's backbone is read. The model is returned without drop path, in fp32.
    """
    from dinov2_jax import configs
    from dinov2_jax.train import state as state_lib
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.basename(path).isdigit():
        directory, step = os.path.dirname(path), int(os.path.basename(path))
    else:
        directory, step = path, None
    manager = _manager(directory, async_save=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{path} holds no dinov2_jax weights or checkpoint")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    config = configs.from_json(meta["config"])
    networks = state_lib.build_networks(config)
    model = networks.backbone.clone(dtype=np.float32, drop_path_rate=0.0)
    size = config.crops.global_crops_size
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, size, size, 3)))["params"]
    target = {network: {"backbone": shapes}}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
    return model, restored[network]["backbone"]
