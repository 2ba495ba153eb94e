"""Mesh, sharding rules, multi-host start-up and global batch assembly.

The mesh has two axes, `data` and `fsdp` (config.mesh; -1 = the rest of the devices). Params,
teacher and optimizer state follow regex rules over their '/'-joined paths (config.mesh.rules,
first match wins): `fsdp` shards the largest dimension divisible by the fsdp axis size,
`replicate` keeps a leaf whole; leaves under `mesh.min_shard_size` elements stay replicated.
The batch is split over both axes. A state is born sharded: `jax.jit(init,
out_shardings=state_shardings(...))`.
"""
import math
import os
import re

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """jax.distributed.initialize from flags, SLURM or the TPU environment; no-op alone.

    Explicit arguments win; on SLURM the coordinator is the first node; on TPU VMs jax finds
    everything itself. A single process without any of these is left alone.
    """
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # jax's SLURM cluster detection
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(data, fsdp, device_count):
    """(data, fsdp) with a -1 filled in; raises ValueError when it does not fit."""
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh data={data}, fsdp={fsdp}: at most one -1")
    fixed = math.prod(n for n in sizes if n != -1)
    if device_count % fixed:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not divide {device_count} devices")
    sizes = [device_count // fixed if n == -1 else n for n in sizes]
    if math.prod(sizes) != device_count:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {device_count} devices")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None):
    """A ('data', 'fsdp') mesh over all devices, ICI/NVLink neighbours adjacent on fsdp."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config.data, mesh_config.fsdp, len(devices))
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    return jax.sharding.Mesh(device_array, BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


def _path_name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def fsdp_spec(shape, fsdp_size, min_shard_size):
    """Shard the largest dimension divisible by the fsdp size; small leaves replicated."""
    if fsdp_size == 1 or math.prod(shape) < min_shard_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh, mesh_config):
    """NamedShardings for a state pytree (of arrays or ShapeDtypeStructs) by the regex rules."""
    fsdp_size = mesh.shape["fsdp"]
    rules = [(re.compile(pattern), kind) for pattern, kind in mesh_config.rules]

    def sharding(path, leaf):
        name = _path_name(path)
        kind = next((kind for pattern, kind in rules if pattern.search(name)), "replicate")
        if kind == "fsdp":
            spec = fsdp_spec(leaf.shape, fsdp_size, mesh_config.min_shard_size)
        elif kind == "replicate":
            spec = P()
        else:
            raise ValueError(f"mesh.rules: unknown kind {kind!r} for {name}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def batch_shardings(mesh, batch):
    """Crops and masks split over (data, fsdp) on their image axis (axis 1); the masked-patch
    buffer on its group axis when the groups divide evenly, else replicated."""
    devices = mesh.shape["data"] * mesh.shape["fsdp"]

    def sharding(name, value):
        if name in ("mask_indices", "masks_weight"):
            return NamedSharding(mesh, P(BATCH_AXES) if value.shape[0] % devices == 0 else P())
        return NamedSharding(mesh, P(None, BATCH_AXES))

    return {name: sharding(name, value) for name, value in batch.items()}


def global_batch(local_batch, shardings):
    """This host's numpy batch -> global jax.Arrays (each host holds its own images)."""
    return {name: jax.make_array_from_process_local_data(shardings[name], np.asarray(value))
            for name, value in local_batch.items()}


def bytes_per_device(tree):
    """Largest per-device footprint in bytes of a tree of sharded arrays or abstract arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
    return total
