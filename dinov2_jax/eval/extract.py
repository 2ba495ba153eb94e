"""Frozen-backbone feature extraction, shared by the evaluations, the features CLI and colabs.

`backbone_features` is the pure per-batch function (jit it): the named features of one batch
of normalised NHWC images, in float32. `extract` runs it jitted over an iterable of batches
with progress, and `extract_source` over a data source through the reference's eval
transform (resize the short side to `resize_size` bicubic, center crop `image_size`).

Features (all float32):
  cls         (N, D)     the normed cls token, `forward(x)` of the reference
  patch       (N, P, D)  the normed patch tokens
  reg         (N, R, D)  the normed register tokens
  blocks_cls  (N, n, D)  cls of the last n blocks through the final norm, oldest block first
                         (`get_intermediate_layers(n, return_class_token=True)`)
  patch_mean  (N, D)     mean of the last block's normed patch tokens (the linear probe's
                         avgpool input)
plus `label` (N,) int32 (-1 when unknown) and `index` (N,) int64, the position of each image
in its source, rows sorted by it. Records the data pipeline could not decode are skipped.

Multi-device and multi-host: each host feeds its slice of the source; batches are sharded
over every device of the params' mesh (all devices for host-resident params) and the
features come back replicated, so every host ends with the features of all images.

The command-line pieces the eval CLIs share are `dinov2_jax.eval.cli_flags`.
"""
import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dinov2_jax import configs
from dinov2_jax.configs import ConfigError
from dinov2_jax.data import pipeline, sources
from dinov2_jax.models import vit

# Bad images in an eval set are skipped and counted under the training stream's thresholds.
BAD_RECORD_LIMITS = {key: configs.default_config().train[key]
                     for key in ("max_bad_fraction", "bad_fraction_min_records")}

FEATURES = ("cls", "patch", "reg", "blocks_cls", "patch_mean")


def default_resize_size(image_size, resize_at_224=256):
    """The reference's resize for a crop: 256 for 224, scaled alike for other sizes."""
    return int(round(image_size * resize_at_224 / 224))


def backbone_features(model, params, images, *, features=("cls",), n_last_blocks=4):
    """The requested `features` (see the module docstring) of one image batch, float32."""
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; expected some of {FEATURES}")
    with_blocks = "blocks_cls" in features
    if with_blocks and not 1 <= n_last_blocks <= model.depth:
        raise ConfigError(f"n_last_blocks={n_last_blocks} must be in [1, depth={model.depth}]")
    out = model.apply({"params": params}, images, collect_layers=with_blocks)
    available = {  # Under jit, whatever is not requested is never computed.
        "cls": out["x_norm_clstoken"],
        "patch": out["x_norm_patchtokens"],
        "reg": out["x_norm_regtokens"],
        "patch_mean": out["x_norm_patchtokens"].astype(jnp.float32).mean(axis=1),
    }
    if with_blocks:
        blocks = vit.intermediate_layers(model, params, out["layers"], n_last_blocks,
                                         return_class_token=True)
        available["blocks_cls"] = jnp.stack([cls for _, cls in blocks], axis=1)
    return {name: available[name].astype(jnp.float32) for name in features}


def batch_mesh(params):
    """The params' mesh when they are sharded on one, else a 1-D mesh of all devices."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return Mesh(np.asarray(jax.devices()), ("batch",))


def replicate(tree, mesh):
    """`tree` on `mesh`, replicated, except leaves already sharded on it."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return leaf
        return jax.device_put(leaf, replicated)

    return jax.tree.map(place, tree)


@functools.lru_cache(maxsize=16)
def _jitted_forward(model, features, n_last_blocks, mesh):
    def forward(params, images, labels, index):
        out = backbone_features(model, params, images, features=features,
                                n_last_blocks=n_last_blocks)
        return out, labels, index

    return jax.jit(forward, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _with_dtype(model, dtype):
    if dtype is None or jnp.dtype(dtype) == jnp.dtype(model.dtype):
        return model
    return model.clone(dtype=jnp.dtype(dtype))


def _padded(batch, size, image_shape):
    """A host batch padded to `size` rows; padding rows get index -1."""
    images = np.asarray(batch["image"], np.float32) if batch is not None else None
    count = 0 if images is None else images.shape[0]
    if count > size:
        raise ValueError(f"a batch of {count} images is larger than batch_size={size}")
    if images is not None and images.shape[1:] != image_shape:
        raise ValueError(f"batch images have shape {images.shape[1:]}, expected {image_shape}")
    padded_images = np.zeros((size, *image_shape), np.float32)
    labels = np.full((size,), sources.UNKNOWN_LABEL, np.int32)
    index = np.full((size,), -1, np.int64)
    if count:
        padded_images[:count] = images
        if "label" in batch:
            labels[:count] = batch["label"]
        index[:count] = batch["index"]
    return padded_images, labels, index


def extract(model, params, batches, *, features=("cls",), n_last_blocks=4, dtype=None,
            batch_size=None, num_batches=None, image_shape=None, num_images=None,
            progress=True, desc="features"):
    """Features of every image of `batches`, an iterable of dicts with "image" (b, H, W, 3)
    normalised float32, "index" (b,) (position of each image) and optionally "label" (b,).

    `batch_size` (this host's rows per step; default: the first batch's) is padded up to a
    multiple of the local device count. On several hosts pass the same `batch_size`,
    `num_batches` and `image_shape` (H, W, 3) everywhere: a host that runs out of batches
    feeds empty ones. `dtype` (e.g. jnp.bfloat16) overrides the model's compute dtype;
    params stay as they are. Returns numpy arrays (see the module docstring), rows sorted
    by index.
    """
    model = _with_dtype(model, dtype)
    mesh = batch_mesh(params)
    params = replicate(params, mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    forward = _jitted_forward(model, tuple(features), n_last_blocks, mesh)
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None and (num_batches is None or image_shape is None or batch_size is None):
        raise ConfigError("no images to extract features from")
    if first is not None:
        image_shape = tuple(np.shape(first["image"])[1:])
        batch_size = batch_size or np.shape(first["image"])[0]
    local_devices = jax.local_device_count()
    padded_size = -(-batch_size // local_devices) * local_devices
    bar = tqdm.tqdm(total=num_images, unit="img", desc=desc, file=sys.stderr,
                    disable=not progress or jax.process_index() != 0)
    collected = {name: [] for name in (*features, "label", "index")}

    def collect(result):
        out, labels, index = jax.tree.map(np.asarray, result)
        valid = index >= 0
        for name, value in (*out.items(), ("label", labels), ("index", index)):
            collected[name].append(value[valid])
        bar.update(int(valid.sum()))

    pending, step, batch = None, 0, first
    while batch is not None or (num_batches is not None and step < num_batches):
        arrays = _padded(batch, padded_size, image_shape)
        arrays = [jax.make_array_from_process_local_data(batch_sharding, a) for a in arrays]
        dispatched = forward(params, *arrays)  # Runs while the previous result is copied.
        if pending is not None:
            collect(pending)
        pending, step = dispatched, step + 1
        batch = next(iterator, None)
    if pending is not None:
        collect(pending)
    bar.close()
    result = {name: np.concatenate(values) for name, values in collected.items()}
    order = np.argsort(result["index"], kind="stable")
    return {name: value[order] for name, value in result.items()}


def extract_source(model, params, source, *, features=("cls",), image_size=224,
                   resize_size=None, batch_size=256, n_last_blocks=4, dtype=None, num_workers=0,
                   progress=True, desc=None):
    """`extract` over a data source (a source string such as 'folder:/x' or an opened
    source) through the reference's eval transform. `batch_size` is the global batch."""
    name = source if isinstance(source, str) else type(source).__name__
    if isinstance(source, str):
        source = sources.open_source(source)
    process_count = jax.process_count()
    if batch_size % process_count:
        raise ConfigError(f"batch_size={batch_size} is not divisible by the {process_count} "
                          "hosts")
    host_batch = batch_size // process_count
    iterator = pipeline.make_eval_iterator(
        source, image_size=image_size,
        resize_size=default_resize_size(image_size) if resize_size is None else resize_size,
        batch_size=host_batch, num_workers=num_workers,
        **BAD_RECORD_LIMITS)
    host_images = math.ceil(len(source) / process_count)
    return extract(model, params, iterator, features=features, n_last_blocks=n_last_blocks,
                   dtype=dtype, batch_size=host_batch,
                   num_batches=math.ceil(host_images / host_batch),
                   image_shape=(image_size, image_size, 3), num_images=len(source),
                   progress=progress, desc=desc or name)


def array_batches(images, batch_size):
    """Batches of an (N, H, W, 3) array of normalised images, for `extract`."""
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start:start + batch_size], np.float32)
        yield {"image": chunk, "index": np.arange(start, start + len(chunk))}
