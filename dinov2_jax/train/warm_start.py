"""Warm starts: a run's step-0 state from another run's newest checkpoint (`train.init_from`).

Student and teacher (backbones and heads) and the centers come from the newest committed
checkpoint of the source workdir, read (only read) by orbax straight into this run's
shardings: nothing in the source is written. The step, the optimizer state and so every
schedule are this run's own, from step 0. Learned position tables are resampled to this run's
patch grid with the interpolation the model itself applies to other grids
(`models/pos_embed.py`), so at the new crop size the warm-started networks compute what the
source's compute at that size. The loop calls this only for a run without checkpoints of its
own: a run that resumes continues from them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dinov2_jax.errors import ConfigError
from dinov2_jax.models import pos_embed
from dinov2_jax.train import checkpoint as checkpoint_lib

CARRIED = ("student", "teacher", "centers")  # the rest of the state starts fresh
NETWORKS = ("student", "teacher")


def _fail(message):
    raise ConfigError(f"config error at train.init_from: {message}")


def _absolute(path):
    path = epath.Path(path)
    return path if path.is_absolute() else path.absolute()


def newest_checkpoint(path):
    """(checkpoints directory, newest committed step) of a workdir or its `checkpoints` dir."""
    path = _absolute(path)
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not directory.is_dir():
        _fail(f"{path} does not exist or is not a directory")
    steps = ocp.utils.checkpoint_steps(directory)  # finalized ones only; reads nothing else
    step = max(steps) if steps else None
    if step is None:
        _fail(f"{path} holds no committed checkpoint (expected WORKDIR/checkpoints/<step>, as "
              "python -m dinov2_jax.main writes them)")
    return directory, step


def _shape_text(leaf):
    return f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}"


def _name(path):
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_resampled_table(path, saved, target):
    """A learned position table (1, 1 + M*M, D) of another square grid with the same width."""
    if _name(path).split("/")[-1] != "pos_embed" or len(saved.shape) != 3 or \
            len(target.shape) != 3:
        return False
    squares = [int(round(np.sqrt(rows - 1))) ** 2 == rows - 1
               for rows in (saved.shape[1], target.shape[1])]
    return saved.shape[2] == target.shape[2] and all(squares)


def _check_fits(saved, abstract, directory, step):
    """ConfigError naming the first differing parameter and both shapes unless every carried
    leaf of the source has this run's shape (position tables may have another grid)."""
    for name in CARRIED:
        if name not in saved:
            _fail(f"the checkpoint at step {step} in {directory} has no {name!r}")
    carried = {name: abstract[name] for name in CARRIED}
    targets = {_name(path): leaf for path, leaf in
               jax.tree_util.tree_flatten_with_path(carried)[0]}

    def saved_text(path, leaf):
        target = targets.get(_name(path))
        resampled = target is not None and _is_resampled_table(path, leaf, target)
        return _shape_text(target if resampled else leaf)

    got = jax.tree_util.tree_map_with_path(saved_text, {name: saved[name] for name in CARRIED})
    difference = checkpoint_lib.first_difference(jax.tree.map(_shape_text, carried), got)
    if difference:
        _fail(f"the checkpoint at step {step} in {directory} does not fit this run's networks "
              f"(student.arch and its sizes, heads, crops): {difference}")


def _restore(directory, step, saved, abstract):
    """The carried trees of the source: leaves of this run's shape restored into this run's
    shardings, position tables of another grid as host arrays."""
    target, restore_args = {}, {}
    for name in CARRIED:
        def target_leaf(saved_leaf, leaf):
            if tuple(saved_leaf.shape) == tuple(leaf.shape):
                return leaf
            return jax.ShapeDtypeStruct(tuple(saved_leaf.shape), leaf.dtype)

        def args_leaf(saved_leaf, leaf):
            if tuple(saved_leaf.shape) == tuple(leaf.shape):
                return ocp.ArrayRestoreArgs(sharding=leaf.sharding, dtype=leaf.dtype)
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)

        target[name] = jax.tree.map(target_leaf, saved[name], abstract[name])
        restore_args[name] = jax.tree.map(args_leaf, saved[name], abstract[name])
    return ocp.PyTreeCheckpointer().restore(
        directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                    partial_restore=True))


def _resample_tables(restored, abstract, model):
    """Resamples each network's learned position table to this run's grid, in place; the
    resampled grids as {network: 'MxM -> NxN'}."""
    resampled = {}
    for name in NETWORKS:
        backbone = restored[name]["backbone"]
        target = abstract[name]["backbone"].get("pos_embed")
        if target is None or tuple(backbone["pos_embed"].shape) == tuple(target.shape):
            continue
        table = backbone["pos_embed"]
        side, new_side = (int(round(np.sqrt(rows - 1))) for rows in (table.shape[1],
                                                                      target.shape[1]))
        new_table = np.asarray(pos_embed.interpolate_pos_embed(
            jnp.asarray(table), new_side, new_side, offset=model.interpolate_offset,
            antialias=model.interpolate_antialias))
        backbone["pos_embed"] = jax.make_array_from_callback(
            target.shape, target.sharding, lambda index, t=new_table: t[index])
        resampled[name] = f"{side}x{side} -> {new_side}x{new_side}"
    return resampled


def initial_state(setup):
    """(step-0 state, start-up line) of `setup`'s run from `setup.config.train.init_from`.

    ConfigError (naming train.init_from) when the source has no committed checkpoint or its
    networks do not fit this run's, before anything is built.
    """
    source = setup.config.train.init_from
    directory, step = newest_checkpoint(source)
    saved = ocp.StandardCheckpointHandler().metadata(directory / str(step) / "state").tree
    abstract = setup.abstract_state
    _check_fits(saved, abstract, directory, step)
    state = setup.create_state()
    for name in CARRIED:  # freed before the source's arrays arrive
        del state[name]
    restored = _restore(directory, step, saved, abstract)
    resampled = _resample_tables(restored, abstract, setup.networks.backbone)
    state.update(restored)
    # Fresh optimizer moments for the new student (AdamW's are zeros; its count is 0).
    state["opt_state"] = jax.jit(setup.optimizer.init,
                                 out_shardings=setup.state_shardings["opt_state"])(
                                     state["student"])
    grids = ("; position tables resampled " + ", ".join(
        f"{name} {grid}" for name, grid in resampled.items())) if resampled else ""
    return state, (f"initialised from {source} (step {step} of {directory}): student, teacher, "
                   f"heads and centers; optimizer and schedules start at step 0{grids}")
