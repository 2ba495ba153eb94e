"""Linear semantic segmentation on frozen patch tokens: the DINOv2 paper's ADE20k protocol.

The protocol of the reference's linear configs (`dinov2/eval/segmentation`, mmseg):
- frozen backbone; size x size windows (518: the reference's 512 crop padded to the patch
  multiple); features are the last block's patch tokens through the final norm ("linear"),
  or the last 4 blocks' concatenated ("+ms", `layers=4`, used with test-time scales
  1.0, 1.32, 1.73, 2.28, 3.0 and flips, `multiscale`; the paper runs it at 640 px);
- head: batch norm (synchronised over devices) then a 1x1 linear classifier (weights
  N(0, 0.01^2)); logits bilinearly upsampled to the window; cross-entropy with ignore index
  255, averaged over all pixels (mmseg's default, ignored pixels count 0);
- AdamW (lr 1e-3, weight decay 1e-4), poly decay with 1,500 linear warm-up steps, 40,000
  steps of 16 windows;
- evaluation: the image resized to short side `size`, windows at stride 2/3 of the side,
  window logits averaged where they overlap, resized to the label's resolution, softmax
  averaged over test-time views, argmax;
- metrics (mmseg's): per-class IoU = intersection / union summed over the whole set, mIoU
  their mean over the classes that occur in the labels or predictions, aAcc the pixel
  accuracy, mAcc the mean per-class accuracy, all in percent.

By design the head trains on cached features (see `dense`): one random window per training
image and view, drawn once, instead of a fresh random rescale, crop, flip and photometric
distortion every step; `train_scales` and `train_flip` add fixed rescaled and mirrored views.

  python -m dinov2_jax.eval.segmentation --weights W [--arch A] --train SRC --val SRC \\
      [--size 518] [--layers 4 --multiscale] [--output results.json]
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import flags

from dinov2_jax import cli
from dinov2_jax.configs import ConfigError
from dinov2_jax.eval import dense, dense_data

MULTISCALE_RATIOS = (1.0, 1.32, 1.73, 2.28, 3.0)


class LinearHead(nn.Module):
    """Batch norm then a 1x1 linear classifier over patch features (B, h, w, C)."""
    num_classes: int

    @nn.compact
    def __call__(self, patch, cls, train):
        del cls  # The segmentation head reads patch tokens only.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(patch)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01))(x)


def cross_entropy(logits, labels, ignore_index=dense_data.IGNORE_INDEX):
    """Mean over all pixels of the cross-entropy of (B, h, w, K) logits upsampled to the
    (B, S, S) labels; ignored pixels count 0 (mmseg's CrossEntropyLoss)."""
    logits = dense.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:])
    valid = labels != ignore_index
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.mean(jnp.where(valid, losses, 0.0))


@jax.jit(static_argnames=("num_classes", "ignore_index"))
def confusion_matrix(prediction, label, num_classes, ignore_index=dense_data.IGNORE_INDEX):
    """(K, K) int32 counts of (label, prediction) pixel pairs, ignored pixels left out."""
    valid = label != ignore_index
    pairs = jnp.where(valid, label * num_classes + prediction, 0).reshape(-1)
    counts = jnp.bincount(pairs, weights=valid.reshape(-1).astype(jnp.int32),
                          length=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def metrics_from_confusion(confusion, prefix="segmentation"):
    """mIoU, aAcc, mAcc and per-class IoU (classes with a non-empty union) in percent."""
    confusion = np.asarray(confusion, np.float64)
    intersection = np.diag(confusion)
    label_area, prediction_area = confusion.sum(axis=1), confusion.sum(axis=0)
    union = label_area + prediction_area - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / union
        accuracy = intersection / label_area
    if not np.any(union > 0):
        raise ConfigError("no labelled pixel to score (every pixel is ignored)")
    results = {f"{prefix}/mIoU": 100.0 * float(np.nanmean(iou)),
               f"{prefix}/aAcc": 100.0 * float(intersection.sum() / label_area.sum()),
               f"{prefix}/mAcc": 100.0 * float(np.nanmean(accuracy))}
    for index in np.flatnonzero(union > 0):
        results[f"{prefix}/IoU/{index}"] = 100.0 * float(iou[index])
    return results


def _softmax(x):
    return jax.nn.softmax(x, axis=-1)


def evaluate(model, params, train_source, val_source, *, image_size, batch_size=32,
             layers=1, multiscale=False, scales=MULTISCALE_RATIOS, stride=None,
             steps=dense.HEAD_STEPS, head_batch_size=dense.HEAD_BATCH_SIZE, lr=dense.HEAD_LR,
             weight_decay=dense.HEAD_WEIGHT_DECAY, warmup_steps=dense.HEAD_WARMUP_STEPS,
             train_scales=(1.0,), train_flip=False,
             random_window=True, cache_dtype=np.float32, num_workers=4, seed=0,
             keep_predictions=0, progress=True):
    """Trains the linear head on `train_source` windows and scores it on `val_source`.

    Sources are dense source strings (`dense_data`) or opened sources. Returns (results,
    predictions): results a flat dict of floats ("segmentation/mIoU", ".../aAcc", ".../mAcc",
    ".../IoU/<class>", ".../skipped_pairs", ...), predictions a list of (val index, (H, W)
    int32 predicted classes) of the first `keep_predictions` usable val images.
    """
    train_source, val_source = (dense_data.open_dense_source(s) if isinstance(s, str) else s
                                for s in (train_source, val_source))
    for source in (train_source, val_source):
        if source.task != "segmentation":
            raise ConfigError(f"source {source.name!r} holds depth, not segmentation masks")
    if train_source.num_classes != val_source.num_classes:
        raise ConfigError(f"train has {train_source.num_classes} classes, val "
                          f"{val_source.num_classes}")
    num_classes = train_source.num_classes
    stride = stride or dense_data.default_stride(image_size)
    blocks = dense.block_indices(model.depth, layers, spread=False)
    common = dict(size=image_size, stride=stride, blocks=blocks, norm=True,
                  batch_size=batch_size, cache_dtype=cache_dtype, num_workers=num_workers,
                  seed=seed, progress=progress)
    train = dense.extract_windows(model, params, train_source, train=True, scales=train_scales,
                                  flip=train_flip, random_window=random_window,
                                  desc="segmentation train features", **common)
    head = LinearHead(num_classes)
    variables, train_loss = dense.train_head(
        head, lambda logits, labels, step: cross_entropy(logits, labels), train, steps=steps,
        batch_size=head_batch_size, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, seed=seed, progress=progress, desc="segmentation head")
    train_skipped = train.skipped
    del train
    val = dense.extract_windows(model, params, val_source, train=False,
                                scales=tuple(scales) if multiscale else (1.0,), flip=multiscale,
                                desc="segmentation val features", **common)
    variables = jax.device_get(variables)
    window_logits = dense.WindowMaps(head, model.patch_size)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    predictions = []
    for index in tqdm.tqdm(sorted(val.views), desc="segmentation val", file=sys.stderr,
                           disable=not progress or jax.process_index() != 0):
        patch, cls, boxes, specs = dense.image_windows(val, index)
        _, label = val_source.load(index)
        probabilities = dense.predict_image(variables, patch, cls, boxes,
                                            window_maps=window_logits, view_specs=specs,
                                            out_shape=label.shape, post=_softmax)
        prediction = jnp.argmax(probabilities, axis=-1).astype(jnp.int32)
        confusion += np.asarray(confusion_matrix(prediction, jnp.asarray(label), num_classes))
        if len(predictions) < keep_predictions:
            predictions.append((index, np.asarray(prediction)))
    results = metrics_from_confusion(confusion)
    results.update({
        "segmentation/train_loss": train_loss,
        "segmentation/val_images": float(len(val.views)),
        "segmentation/skipped_pairs": float(train_skipped + val.skipped),
        "segmentation/unpaired_files": float(train_source.unpaired + val_source.unpaired),
    })
    return results, predictions


def _floats(text, name):
    try:
        return tuple(float(v) for v in text.split(",") if v)
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated numbers, got {text!r}") from None


def _define(flag_values):
    dense.define_flags(flag_values, size=518, batch_size=32)
    flags.DEFINE_string("train", None, "training pairs: ade20k:ROOT:training, "
                        "segfolder:ROOT:num_classes=N", required=True, flag_values=flag_values)
    flags.DEFINE_string("val", None, "validation pairs: ade20k:ROOT:validation, ...",
                        required=True, flag_values=flag_values)
    flags.DEFINE_enum("layers", "1", ("1", "4"), "blocks whose patch tokens are concatenated "
                      "(4: the paper's +ms variant)", flag_values=flag_values)
    flags.DEFINE_boolean("multiscale", False, "test-time scales (--scales) and flips",
                         flag_values=flag_values)
    flags.DEFINE_string("scales", ",".join(map(str, MULTISCALE_RATIOS)),
                        "test-time scales with --multiscale", flag_values=flag_values)
    flags.DEFINE_string("train_scales", "1.0", "fixed rescaled views of each training image",
                        flag_values=flag_values)
    dense.define_head_flags(flag_values)


def main(argv=None):
    args = cli.parse(argv, _define, "Linear segmentation probe (ADE20k protocol) of a backbone.")
    model, params = dense.load_model(args)
    results, _ = evaluate(
        model, params, args.train, args.val, image_size=args.size, batch_size=args.batch_size,
        layers=int(args.layers), multiscale=args.multiscale,
        scales=_floats(args.scales, "scales"), train_scales=_floats(args.train_scales,
                                                                   "train_scales"),
        **dense.head_arguments(args))
    dense.report(results, args, "segmentation", train=args.train, val=args.val,
                 layers=int(args.layers), multiscale=args.multiscale, steps=args.steps)


if __name__ == "__main__":
    cli.run(main)
