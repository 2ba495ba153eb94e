"""Shared machinery of the dense probes: window features cached once, heads trained on them.

A dense probe (segmentation, depth) runs the frozen backbone once per window of every image
(see `dense_data` for the windows), keeps the patch tokens (and cls tokens) of the chosen
blocks on the host, trains a small head on those cached features for many steps, then
predicts every window of every validation image, stitches the windows back (overlaps
averaged, as mmseg's sliding-window inference does), resizes to the label's resolution and
averages test-time views (scales, flips). Everything that touches arrays is jitted; backbone
batches and head batches are sharded over the params' mesh (or all devices), the head's
params are replicated, so batch norm statistics are global (SyncBN).

`window_views` lists the views of one image; `extract_windows` caches the features of all
windows of a source; `train_head` fits a flax head with AdamW and mmseg's poly schedule with
linear warm-up; `predict_image` stitches one image's windows. The probes' CLI pieces (on
`cli_flags`) live here too.
"""
import concurrent.futures
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dinov2_jax.configs import ConfigError
from dinov2_jax.eval import cli_flags, dense_data, extract
from dinov2_jax.models import vit

# The heads' optimisation, shared by the segmentation and depth probes (mmseg's linear-head
# schedule, which the depth toolbox's configs use too): AdamW, poly decay, linear warm-up.
HEAD_STEPS = 40_000
HEAD_BATCH_SIZE = 16
HEAD_LR = 1e-3
HEAD_WEIGHT_DECAY = 1e-4
HEAD_WARMUP_STEPS = 1_500

# Blocks the depth protocol's 4-layer variant reads (0-based), from the reference's
# dinov2/hub/depthers.py: {3, 6, 9, 12}, {5, 12, 18, 24}, {10, 20, 30, 40} in the paper.
SPREAD_LAYERS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}


def block_indices(depth, layers, spread):
    """Blocks whose outputs a head reads: the last `layers`, or (spread) evenly spaced."""
    if layers not in (1, 4):
        raise ConfigError(f"layers={layers} must be 1 or 4")
    if layers > depth:
        raise ConfigError(f"layers={layers} needs a backbone of 4 or more blocks, not {depth}")
    if layers == 1:
        return (depth - 1,)
    if spread:
        return SPREAD_LAYERS.get(depth, tuple(round((i + 1) * depth / 4) - 1 for i in range(4)))
    return tuple(range(depth - 4, depth))


@dataclasses.dataclass(frozen=True)
class View:
    """One test-time view of an image: resized to `shape`, maybe flipped, cut at `boxes`."""
    shape: tuple
    flip: bool
    boxes: np.ndarray


def window_views(shape, size, stride, scales=(1.0,), flip=False):
    """The views of an image of `shape`: every scale, then (flip) each mirrored."""
    views = []
    for scale in scales:
        resized = dense_data.resized_shape(shape, size, scale)
        boxes = dense_data.window_boxes(resized, size, stride)
        views.append(View(resized, False, boxes))
        if flip:
            views.append(View(resized, True, boxes))
    return views


def view_windows(image, view):
    """(n, size, size, 3) normalised windows of `image` for `view`."""
    resized = dense_data.resize_image(image, view.shape)
    if view.flip:
        resized = resized[:, ::-1]
    return dense_data.crop_windows(dense_data.normalize(resized), view.boxes, 0.0)


# ------------------------------------------------------------------------------------------
# Backbone features of windows.


def shard_batch(array, mesh):
    """A host array (the same on every host) as a global array split over the mesh on axis 0."""
    sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


@functools.lru_cache(maxsize=16)
def _window_forward(model, blocks, norm, mesh):
    def forward(params, images):
        outputs = vit.get_intermediate_layers(model, params, images, n=blocks, reshape=True,
                                              return_class_token=True, norm=norm)
        patch = jnp.concatenate([patches for patches, _ in outputs], axis=-1)
        cls = jnp.concatenate([cls for _, cls in outputs], axis=-1)
        return patch.astype(jnp.float32), cls.astype(jnp.float32)

    return jax.jit(forward, out_shardings=NamedSharding(mesh, PartitionSpec()))


@dataclasses.dataclass
class WindowCache:
    """Features of every window, in source order: patch (N, h, w, C), cls (N, C), the
    image index (N,) of each window, the views of each kept image, and targets (N, S, S)
    when the windows are training crops. `skipped` counts unusable pairs."""
    patch: np.ndarray
    cls: np.ndarray
    image: np.ndarray
    views: dict
    targets: np.ndarray | None
    skipped: int
    skipped_keys: list


def _prepare(source, index, size, stride, scales, flip, train, random_window, seed):
    """(views, windows, targets) of pair `index`, or the BadPairError that it raised."""
    try:
        image, target = source.load(index)
    except dense_data.BadPairError as error:
        return error
    rng = np.random.default_rng([seed, index])
    fill = dense_data.IGNORE_INDEX if source.task == "segmentation" else 0.0
    views, windows, targets = [], [], []
    for view in window_views(image.shape[:2], size, stride, scales=scales, flip=flip):
        cut = view_windows(image, view)
        if train:
            picked = [int(rng.integers(len(view.boxes)))] if random_window \
                else list(range(len(view.boxes)))
            view = dataclasses.replace(view, boxes=view.boxes[picked])
            cut = cut[picked]
            resized = dense_data.resize_target(target, view.shape)
            targets.append(dense_data.crop_windows(resized[:, ::-1] if view.flip else resized,
                                                   view.boxes, fill))
        views.append(view)
        windows.append(cut)
    return views, np.concatenate(windows), targets


def extract_windows(model, params, source, *, size, stride, blocks, norm, train,
                    scales=(1.0,), flip=False, random_window=True, batch_size=32,
                    cache_dtype=np.float32, num_workers=4, seed=0, progress=True, desc=None):
    """Caches the window features of every usable pair of `source` (see `WindowCache`).

    Every scale and (flip) mirror is a view. Training windows (`train`): `random_window`
    keeps one random window per view (the reference's random crop, drawn once), else all,
    with their targets (nearest resize, IGNORE_INDEX / 0 past the border). Evaluation: all
    windows of all views (test-time augmentation), no targets. Pairs are decoded by
    `num_workers` threads.
    """
    if size % model.patch_size:
        raise ConfigError(f"size {size} is not a multiple of the patch size {model.patch_size}")
    mesh = extract.batch_mesh(params)
    params = extract.replicate(params, mesh)
    forward = _window_forward(model, tuple(blocks), bool(norm), mesh)
    padded = -(-batch_size // jax.device_count()) * jax.device_count()
    collected = {"patch": [], "cls": [], "image": [], "targets": []}
    views_of, skipped_keys, pending, pending_ids = {}, [], [], []
    bar = tqdm.tqdm(total=len(source), unit="img", desc=desc or f"features {source.name}",
                    file=sys.stderr, disable=not progress or jax.process_index() != 0)

    def run(count):
        images = np.zeros((padded, size, size, 3), np.float32)
        images[:count] = np.stack(pending[:count])
        patch, cls = jax.tree.map(np.asarray, forward(params, shard_batch(images, mesh)))
        collected["patch"].append(patch[:count].astype(cache_dtype))
        collected["cls"].append(cls[:count].astype(cache_dtype))
        collected["image"].append(np.asarray(pending_ids[:count], np.int32))
        del pending[:count], pending_ids[:count]

    prepare = functools.partial(_prepare, source, size=size, stride=stride, scales=scales,
                                flip=flip, train=train, random_window=random_window, seed=seed)
    chunk = max(1, num_workers) * 8  # Decoded-ahead pairs held in memory at most.
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        for first in range(0, len(source), chunk):
            indices = range(first, min(first + chunk, len(source)))
            for index, prepared in zip(indices, pool.map(prepare, indices)):
                bar.update(1)
                if isinstance(prepared, dense_data.BadPairError):
                    skipped_keys.append(str(prepared))
                    continue
                views_of[index], windows, targets = prepared
                collected["targets"].extend(targets)
                pending.extend(windows)
                pending_ids.extend([index] * len(windows))
                while len(pending) >= padded:
                    run(padded)
    if pending:
        run(len(pending))
    bar.close()
    if not views_of:
        raise ConfigError(f"source {source.name!r}: none of its {len(source)} pairs is usable"
                          + (f" (first problem: {skipped_keys[0]})" if skipped_keys else ""))
    if skipped_keys:
        print(f"{source.name}: skipped {len(skipped_keys)} unusable pairs; first: "
              f"{skipped_keys[0]}", file=sys.stderr)
    return WindowCache(
        patch=np.concatenate(collected["patch"]), cls=np.concatenate(collected["cls"]),
        image=np.concatenate(collected["image"]), views=views_of,
        targets=np.concatenate(collected["targets"]) if train else None,
        skipped=len(skipped_keys), skipped_keys=skipped_keys)


# ------------------------------------------------------------------------------------------
# Head training on cached features.


def poly_schedule(lr, steps, warmup_steps, warmup_ratio=1e-6, power=1.0):
    """mmcv's `poly` policy with linear warm-up: lr (1 - t/steps)^power, scaled during the
    first warmup_steps by 1 - (1 - t/warmup)(1 - warmup_ratio)."""
    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        regular = lr * (1.0 - jnp.minimum(count, steps) / steps) ** power
        if warmup_steps <= 0:
            return regular
        k = (1.0 - count / warmup_steps) * (1.0 - warmup_ratio)
        return jnp.where(count < warmup_steps, regular * (1.0 - k), regular)

    return schedule


def train_head(head, loss_fn, data, *, steps, batch_size, lr, weight_decay, warmup_steps,
               seed=0, progress=True, desc="head"):
    """Variables of `head` (a flax module: head(patch, cls, train) -> outputs) fitted with
    AdamW (betas 0.9, 0.999) and `poly_schedule` to minimise `loss_fn(outputs, targets,
    step)` over random batches of `data` (anything with `patch`, `cls` and `targets` arrays of
    equal length, such as a training `WindowCache`; a new permutation per epoch). Returns
    (variables, final loss)."""
    if steps < 1:
        raise ConfigError(f"steps={steps} must be at least 1")
    count = len(data.patch)
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    batch_size = -(-min(batch_size, count) // jax.device_count()) * jax.device_count()
    key = jax.random.key(seed)
    init = jax.jit(functools.partial(head.init, train=False))  # One compile, not one per op.
    variables = init(key, jnp.asarray(data.patch[:1], jnp.float32),
                     jnp.asarray(data.cls[:1], jnp.float32))
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    optimizer = optax.adamw(poly_schedule(lr, steps, warmup_steps), b1=0.9, b2=0.999,
                            weight_decay=weight_decay)
    params, state = extract.replicate(params, mesh), extract.replicate(state, mesh)
    opt_state = extract.replicate(optimizer.init(params), mesh)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step_fn(params, state, opt_state, patch, cls, targets, step):
        def loss_of(params):
            outputs, updates = head.apply({"params": params, **state}, patch.astype(jnp.float32),
                                          cls.astype(jnp.float32), train=True,
                                          mutable=list(state))
            return loss_fn(outputs, targets, step), updates

        (loss, updates), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        changes, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), {**state, **updates}, opt_state, loss

    rng = np.random.default_rng(seed)
    order, position, loss = rng.permutation(count), 0, None
    bar = tqdm.trange(steps, desc=desc, file=sys.stderr,
                      disable=not progress or jax.process_index() != 0)
    for step in bar:
        if position + batch_size > count:
            order, position = rng.permutation(count), 0
        rows = np.sort(order[position:position + batch_size]) if batch_size <= count \
            else rng.integers(count, size=batch_size)
        position += batch_size
        params, state, opt_state, loss = step_fn(
            params, state, opt_state, shard_batch(data.patch[rows], mesh),
            shard_batch(data.cls[rows], mesh), shard_batch(data.targets[rows], mesh),
            jnp.asarray(step, jnp.int32))
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    return {"params": params, **state}, float(loss)


# ------------------------------------------------------------------------------------------
# Prediction of one image from its cached windows.


def stitch_windows(maps, boxes, canvas_shape, flip):
    """Average of window maps (n, S, S, K) at `boxes` over a canvas_shape canvas, overlaps
    averaged as mmseg's slide inference does (windows may run past the border); mirrored
    back when the view was flipped."""
    maps, boxes = jnp.asarray(maps), jnp.asarray(boxes)
    size = maps.shape[1]
    padded_shape = (max(canvas_shape[0], size), max(canvas_shape[1], size), maps.shape[-1])

    def add(i, sums):
        total, count = sums
        top, left = boxes[i, 0], boxes[i, 1]
        window = jax.lax.dynamic_slice(total, (top, left, 0), (size, size, maps.shape[-1]))
        seen = jax.lax.dynamic_slice(count, (top, left), (size, size))
        total = jax.lax.dynamic_update_slice(total, window + maps[i], (top, left, 0))
        count = jax.lax.dynamic_update_slice(count, seen + 1.0, (top, left))
        return total, count

    total, count = jax.lax.fori_loop(0, maps.shape[0], add,
                                     (jnp.zeros(padded_shape), jnp.zeros(padded_shape[:2])))
    canvas = (total / jnp.maximum(count, 1.0)[..., None])[:canvas_shape[0], :canvas_shape[1]]
    return canvas[:, ::-1] if flip else canvas


def resize_bilinear(x, shape):
    """Bilinear resize of (..., H, W, K) to shape (torch's interpolate, align_corners=False,
    no antialiasing)."""
    return jax.image.resize(x, (*x.shape[:-3], *shape, x.shape[-1]), "linear", antialias=False)


@functools.partial(jax.jit, static_argnames=("window_maps", "view_specs", "out_shape", "post"))
def predict_image(variables, patch, cls, boxes, *, window_maps, view_specs, out_shape, post):
    """(H, W, K) prediction of one image: `window_maps(variables, patch, cls)` gives each
    window's (n, S, S, K) map; the windows of each view (`view_specs`: (start, count,
    resized shape, flip)) are stitched, resized to out_shape, passed through `post`, and the
    views averaged."""
    maps = window_maps(variables, patch, cls)
    total = 0.0
    for start, count, shape, flip in view_specs:
        canvas = stitch_windows(maps[start:start + count], boxes[start:start + count], shape, flip)
        total = total + post(resize_bilinear(canvas, out_shape))
    return total / len(view_specs)


class WindowMaps:
    """Hashable window -> (n, S, S, K) map of a trained head for `predict_image`: the head's
    (n, h, w, K) output on a window's (patch, cls) tokens (or (n, h, w) with `channel`, given
    a channel axis) resized bilinearly to the window's pixels."""

    def __init__(self, head, patch_size, channel=False):
        self.head, self.patch_size, self.channel = head, patch_size, channel

    def __call__(self, variables, patch, cls):
        out = self.head.apply(variables, patch.astype(jnp.float32), cls.astype(jnp.float32),
                              train=False)
        size = patch.shape[1] * self.patch_size
        return resize_bilinear(out[..., None] if self.channel else out, (size, size))

    def _key(self):
        return self.head, self.patch_size, self.channel

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, WindowMaps) and self._key() == other._key()


def image_windows(cache, index):
    """(patch, cls, boxes, view_specs) of image `index` in an evaluation cache."""
    rows = np.flatnonzero(cache.image == index)
    specs, start = [], 0
    for view in cache.views[index]:
        specs.append((start, len(view.boxes), tuple(view.shape), bool(view.flip)))
        start += len(view.boxes)
    boxes = np.concatenate([view.boxes for view in cache.views[index]])
    return cache.patch[rows], cache.cls[rows], boxes, tuple(specs)


# ------------------------------------------------------------------------------------------
# Command-line pieces of the dense and attentive probes (on top of `cli_flags`).


def define_flags(flag_values, *, size, batch_size):
    """The model flags (`cli_flags.define_model_flags`) and --output."""
    cli_flags.define_model_flags(flag_values, size=size, batch_size=batch_size)
    flags.DEFINE_string("output", None, "results JSON file", flag_values=flag_values)


def define_head_flags(flag_values):
    """Flags of the window heads' training and caching, shared by segmentation and depth."""
    flags.DEFINE_integer("stride", None, "window stride (default 2/3 of --size)",
                         flag_values=flag_values)
    flags.DEFINE_integer("steps", HEAD_STEPS, "head training steps", flag_values=flag_values)
    flags.DEFINE_integer("head_batch_size", HEAD_BATCH_SIZE, "windows per head step",
                         flag_values=flag_values)
    flags.DEFINE_float("lr", HEAD_LR, "peak AdamW learning rate", flag_values=flag_values)
    flags.DEFINE_float("weight_decay", HEAD_WEIGHT_DECAY, "AdamW weight decay",
                       flag_values=flag_values)
    flags.DEFINE_integer("warmup_steps", HEAD_WARMUP_STEPS, "linear warm-up steps",
                         flag_values=flag_values)
    flags.DEFINE_boolean("train_flip", False, "also cache the mirrored training views",
                         flag_values=flag_values)
    flags.DEFINE_enum("train_windows", "random", ("random", "all"), "one random window per "
                      "training view, or all of them", flag_values=flag_values)
    flags.DEFINE_enum("cache_dtype", "float32", ("float32", "bfloat16"), "dtype of the cached "
                      "features on the host (bfloat16 halves their memory)",
                      flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "seed of the head init and window order",
                         flag_values=flag_values)


def head_arguments(flag_values):
    """The `evaluate` keyword arguments that `define_head_flags` sets."""
    args = flag_values
    return dict(stride=args.stride, steps=args.steps, head_batch_size=args.head_batch_size,
                lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                train_flip=args.train_flip, random_window=args.train_windows == "random",
                cache_dtype=jnp.dtype(args.cache_dtype), num_workers=max(1, args.num_workers),
                seed=args.seed)


def load_model(flag_values):
    """(model, params) named by the model flags, computing in --dtype."""
    model, params = cli_flags.load_model(flag_values)
    if jnp.dtype(flag_values.dtype) != jnp.dtype(model.dtype):
        model = model.clone(dtype=jnp.dtype(flag_values.dtype))
    return model, params


def report(results, flag_values, prefix, **context):
    """`cli_flags.report` of `results` with their "prefix/" dropped: {"mIoU": ...}."""
    cli_flags.report({name.removeprefix(prefix + "/"): value for name, value in results.items()},
                     flag_values, **context)
