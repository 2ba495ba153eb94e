"""Checkpoints of a run: orbax CheckpointManager over `state`, the Grain iterator and `meta`.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when
complete), the last `keep` are kept, and a restore takes the target's shardings, so a run can
resume on another mesh or device count. Paths are `etils.epath` paths: a `gs://` workdir
works like a local one.

A resume reads the newest checkpoint's `meta` first, so the caller can compare configs before
the state is touched. A checkpoint that cannot be read (cut off mid-write, truncated, I/O
errors) is moved to `checkpoints_unreadable/` with a warning in favour of the one before it;
one whose state has other leaves or shapes than this run's is an error naming the first
differing leaf (never a silent restart from step 0). A save that runs out of disk space stops
the run with one line naming the step, the path and the intact checkpoint.
"""
import contextlib
import errno
import logging
import re
import shutil
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

from dinov2_jax.errors import ConfigError


class StateMismatchError(ConfigError):
    """A checkpoint's state has other leaves or shapes than the state this run builds."""


class DiskFullError(RuntimeError):
    """A checkpoint save ran out of space; the previous checkpoint is intact."""


def _manager(directory, keep=None, async_save=True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(epath.Path(directory), options=options)


_DISK_FULL = ("RESOURCE_EXHAUSTED", "No space left")


def _is_disk_full(error):
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC)
               or any(text in str(e) for text in _DISK_FULL) for e in _chain(error))


class _DiskFullLogFilter(logging.Filter):
    """Drops orbax's and asyncio's tracebacks of a save that ran out of space: the run
    reports that as one DiskFullError line instead."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not (any(text in record.getMessage() for text in _DISK_FULL)
                    or (error is not None and _is_disk_full(error)))


def _quiet_disk_full_logs():
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DiskFullLogFilter) for f in logger.filters):
            logger.addFilter(_DiskFullLogFilter())


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _bytes_written_here(leaf):
    """Bytes of `leaf` that this process writes: its replica-0 shards of a jax.Array, or the
    whole of a host array."""
    if isinstance(leaf, jax.Array):
        return sum(shard.data.nbytes for shard in leaf.addressable_shards
                   if shard.replica_id == 0)
    return np.asarray(leaf).nbytes


def _shapes(tree):
    return jax.tree.map(lambda leaf: f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}", tree)


def first_difference(expected, got):
    """'path: expected X, got Y' for the first leaf (in path order) that differs between two
    trees, or None when they are equal."""
    flat_expected = {jax.tree_util.keystr(p, simple=True, separator="/"): v
                     for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    flat_got = {jax.tree_util.keystr(p, simple=True, separator="/"): v
                for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    for name in sorted(set(flat_expected) | set(flat_got)):
        if flat_expected.get(name) != flat_got.get(name):
            return (f"{name}: this run has {flat_expected.get(name, 'no such leaf')}, the "
                    f"checkpoint has {flat_got.get(name, 'no such leaf')}")
    return None


class Checkpointer:
    """Saves and restores {state, data_iter, meta} under `workdir/checkpoints`."""

    def __init__(self, workdir, keep=3):
        self.directory = epath.Path(workdir) / "checkpoints"
        self._manager = _manager(self.directory, keep)
        self._in_flight = None  # the step of the newest save started
        _quiet_disk_full_logs()

    def save(self, step, state, data_iter, meta):
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        with self._reporting_disk_full(step):
            self._check_space(step, state)
            self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def _check_space(self, step, state):
        """On a local disk, refuses a save that cannot fit before orbax starts writing it (a
        save that fails midway leaves its writes failing in orbax's threads, each printing a
        traceback). Needed: this process's shards of the state, as written (uncompressed)."""
        if "://" in str(self.directory):
            return
        self._manager.wait_until_finished()  # the previous save's bytes are on disk first
        need = sum(_bytes_written_here(leaf) for leaf in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise self._disk_full(step, f" ({need / 2**20:.1f} MiB to write, "
                                        f"{free / 2**20:.1f} MiB free)")

    def wait(self):
        with self._reporting_disk_full(None):
            self._manager.wait_until_finished()

    def steps(self):
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state, data_iter, check_meta=lambda meta: None):
        """(state, meta) of the newest readable checkpoint, or None when there is none.

        `check_meta(meta)` runs on the newest checkpoint's meta before any state is read; what
        it raises (a config mismatch) propagates with every checkpoint left in place. A
        checkpoint whose state structure differs from `abstract_state` raises
        StateMismatchError. Unreadable checkpoints are set aside.
        """
        for step in reversed(self.steps()):
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                saved = ocp.StandardCheckpointHandler().metadata(
                    self.directory / str(step) / "state").tree
            except Exception as error:  # noqa: BLE001 - an unreadable checkpoint is skipped
                self._set_aside(step, error)
                continue
            check_meta(meta)
            difference = first_difference(_shapes(abstract_state), _shapes(saved))
            if difference:
                raise StateMismatchError(
                    f"the checkpoint at step {step} in {self.directory} does not fit the state "
                    f"this config builds: {difference}. Use a new --workdir, or the config the "
                    "checkpoint was made with")
            args = {"state": ocp.args.StandardRestore(abstract_state),
                    "meta": ocp.args.JsonRestore()}
            if data_iter is not None and meta.get("process_count") == jax.process_count():
                args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            elif data_iter is not None:
                absl_logging.warning("checkpoint at step %d was written by %s processes, this "
                                     "run has %d: the state resumes, the data order starts "
                                     "afresh", step, meta.get("process_count"),
                                     jax.process_count())
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as error:  # noqa: BLE001 - an unreadable checkpoint is skipped
                self._set_aside(step, error)
                continue
            return restored["state"], restored["meta"]
        return None

    def _set_aside(self, step, error):
        """Moves an unreadable step out of the manager's way, keeping it for inspection."""
        aside = self.directory.parent / "checkpoints_unreadable"
        target = aside / f"{step}-{int(time.time())}"
        absl_logging.warning("checkpoint at step %d is unreadable (%s: %s); moved it to %s and "
                             "trying the one before it", step, type(error).__name__,
                             str(error)[:300], target)
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.reload()

    @contextlib.contextmanager
    def _reporting_disk_full(self, step):
        """Turns a save that ran out of space into one DiskFullError line."""
        try:
            yield
            if step is not None:
                self._in_flight = step
        except DiskFullError:
            raise
        except Exception as error:
            if not _is_disk_full(error):
                raise
            written = re.search(r"/(\d+)\.orbax-checkpoint-tmp", " ".join(
                str(e) for e in _chain(error)))
            raise self._disk_full(int(written.group(1)) if written
                                  else (self._in_flight or step)) from None

    def _disk_full(self, failed, detail=""):
        kept = [s for s in self._intact_steps() if s != failed]
        what = f"checkpoint {failed}" if failed is not None else "a checkpoint"
        tail = (f"checkpoint {kept[-1]} is intact; rerun the same command to resume once there "
                "is space" if kept else "there is no earlier checkpoint")
        return DiskFullError(f"no space left writing {what} at {self.directory}{detail}; {tail}")

    def _intact_steps(self):
        """Finished checkpoints on disk (orbax renames a checkpoint into place when complete)."""
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def close(self):
        """Waits for the last save, then stops orbax's threads. After a failed save they are
        left running: closing their event loop under writes that are still failing makes
        each pending write print a traceback (the caller exits; see main.py)."""
        self.wait()
        self._manager.close()
