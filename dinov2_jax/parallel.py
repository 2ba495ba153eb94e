"""Mesh, sharding rules, multi-host start-up and global batch assembly.

The mesh has two axes, `data` and `fsdp` (config.mesh; -1 = the rest of the devices). Params,
teacher and optimizer state follow regex rules over their '/'-joined paths (config.mesh.rules,
first match wins): `fsdp` shards the largest dimension divisible by the fsdp axis size,
`replicate` keeps a leaf whole; leaves under `mesh.min_shard_size` elements stay replicated.
The batch is split over both axes. A state is born sharded: `jax.jit(init,
out_shardings=state_shardings(...))`. On a multi-slice TPU job the `data` axis spans the slices
(DCN) and `fsdp` stays inside a slice (ICI).
"""
import math
import os
import re

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """jax.distributed.initialize from flags or the cluster; a no-op for a lone process.

    Explicit arguments win. Otherwise JAX's own cluster detection runs where a cluster is
    known to be: a SLURM step with several tasks (one per GPU: JAX picks the GPU of
    SLURM_LOCALID; one per node: set JAX_LOCAL_DEVICE_IDS=0,...,7), a GKE TPU pod
    (TPU_WORKER_HOSTNAMES), a multi-slice TPU job (MEGASCALE_COORDINATOR_ADDRESS), or wherever
    DINOV2_JAX_DISTRIBUTED=1 says so (launch/tpu_pod.sh: TPU VMs made with gcloud are found
    through the metadata server, which JAX only asks when told to).
    """
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif ("SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or os.environ.get("TPU_WORKER_HOSTNAMES")
          or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
          or os.environ.get("DINOV2_JAX_DISTRIBUTED") == "1"):
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_shape(data, fsdp, device_count):
    """(data, fsdp) with a -1 filled in; raises ValueError when it does not fit."""
    sizes = [data, fsdp]
    if sizes.count(-1) > 1 or any(n == 0 or n < -1 for n in sizes):
        raise ValueError(f"mesh data={data}, fsdp={fsdp}: use positive sizes and at most one -1")
    fixed = math.prod(n for n in sizes if n != -1)
    if device_count % fixed:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not divide {device_count} devices")
    sizes = [device_count // fixed if n == -1 else n for n in sizes]
    if math.prod(sizes) != device_count:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {device_count} devices")
    return tuple(sizes)


def device_grid(mesh_config, devices):
    """The (data, fsdp) array of devices: neighbours on the fast network adjacent along fsdp.

    Devices of several TPU slices (distinct `slice_index`) are laid out with the slices along
    `data`, so only data-parallel gradient reductions cross the slow data-center network.
    """
    data, fsdp = mesh_shape(mesh_config.data, mesh_config.fsdp, len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return mesh_utils.create_device_mesh((data, fsdp), devices=devices)
    if data % slices:
        raise ValueError(f"mesh.data={data} must be a multiple of the {slices} TPU slices: the "
                         f"fsdp axis has to stay inside a slice")
    return mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1),
                                                devices=devices)


def make_mesh(mesh_config, devices=None):
    """A ('data', 'fsdp') mesh over all devices (see device_grid)."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(device_grid(mesh_config, devices), BATCH_AXES,
                             axis_types=(AxisType.Auto,) * 2)


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
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        kind = next((kind for pattern, kind in rules if pattern.search(name)), "replicate")
        if kind == "fsdp":
            spec = fsdp_spec(leaf.shape, fsdp_size, mesh_config.min_shard_size)
        elif kind == "replicate":
            spec = P()
        else:
            raise ValueError(f"mesh.rules: unknown kind {kind!r} for {name}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def batch_shardings(mesh, local_batch):
    """Shardings of the global batch, given one host's batch.

    Crops and masks are split over (data, fsdp) on their image axis (axis 1). The masked-patch
    buffer (G groups per host) is split on its group axis when the groups of all hosts divide
    evenly over the devices, else replicated.
    """
    devices = mesh.shape["data"] * mesh.shape["fsdp"]

    def sharding(name, value):
        if name in ("mask_indices", "masks_weight"):
            groups = value.shape[0] * jax.process_count()
            return NamedSharding(mesh, P(BATCH_AXES) if groups % devices == 0 else P())
        return NamedSharding(mesh, P(None, BATCH_AXES))

    return {name: sharding(name, value) for name, value in local_batch.items()}


def global_batch(local_batch, shardings):
    """This host's numpy batch -> global jax.Arrays (each host holds its own images).

    A replicated entry (a mask buffer whose groups do not split evenly over the devices) is
    first gathered from all hosts, in the order in which the hosts' images sit in the batch.
    """
    return {name: _global_array(np.asarray(value), shardings[name])
            for name, value in local_batch.items()}


def _global_array(value, sharding):
    if jax.process_count() > 1 and sharding.is_fully_replicated:
        value = _concat_hosts_in_mesh_order(value, sharding.mesh)
    return jax.make_array_from_process_local_data(sharding, value)


def _concat_hosts_in_mesh_order(value, mesh):
    per_host = multihost_utils.process_allgather(value)  # (process_count, ...) by process index
    order = dict.fromkeys(device.process_index for device in mesh.devices.flat)
    return np.concatenate([per_host[index] for index in order])


def bytes_per_device(tree):
    """Largest per-device footprint in bytes of a tree of sharded arrays or abstract arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
    return total
