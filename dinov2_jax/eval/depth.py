"""Linear monocular depth on frozen features: the DINOv2 paper's NYU-Depth-v2 protocol.

The protocol of the reference's linear depth heads (`dinov2/hub/depthers.py`,
`dinov2/eval/depth`):
- frozen backbone, no final norm; features are each read block's patch tokens concatenated
  with its cls token: the last block ("lin. 1") or four evenly spaced blocks ("lin. 4",
  `layers=4`: blocks 3, 6, 9, 12 of a ViT-S/B, 5, 12, 18, 24 of a ViT-L);
- upsampled 4x bilinearly, then a 1x1 linear layer to 256 bins uniformly spaced over
  [min_depth, max_depth] (NYU: 1e-3 to 10 m), probabilities by linear normalisation
  (relu + 0.1, divided by the sum, as in AdaBins), depth = their expectation over the bin
  centres; or (`regression`) one output through relu + min_depth;
- the prediction bilinearly resized to the target; loss the reference's SigLoss
  sqrt(var(g) + 0.15 mean(g)^2), g = log(pred + 1e-3) - log(gt + 1e-3) over the pixels with
  depth > 0, with its warm-up (sqrt(0.15 mean(g)^2) for the first 100 steps). The
  reference's config adds a GradientLoss, but it slices the batch and channel axes of its
  (B, 1, H, W) input, so at the configs' 2 images per GPU it is exactly 0: left out;
- evaluation as in the depth toolbox: windows stitched, resized to the ground truth,
  clipped to [min_depth, max_depth], scored where min_depth < gt < max_depth (and, for
  `nyu:` sources, inside the Eigen crop); per-image RMSE, abs rel, sq rel, RMSE log, log10,
  SILog and delta < 1.25^k, averaged over images.

The 1x1 layer runs before the 4x upsampling here: bilinear resizing is linear with weights
that sum to 1, so it commutes with an affine map and the result is the same, with the layer
on 16x fewer pixels.
The head's input concatenation is a sum of a patch part and a broadcast cls part, so the
cls tokens are cached once per window. Optimiser: AdamW (lr 1e-3, weight decay 1e-4), poly
decay with linear warm-up, as for segmentation (the toolbox's schedule shape).

  python -m dinov2_jax.eval.depth --weights W [--arch A] --train nyu:ROOT:train.txt \\
      --val nyu:ROOT:test.txt [--size 518] [--layers 4] [--output results.json]
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import flags

from dinov2_jax import cli
from dinov2_jax.configs import ConfigError
from dinov2_jax.eval import dense, dense_data

NUM_BINS = 256
UPSAMPLE = 4
SIGLOSS_EPS = 1e-3
SIGLOSS_LAMBDA = 0.15
SIGLOSS_WARMUP = 100
METRICS = ("rmse", "abs_rel", "sq_rel", "rmse_log", "log10", "silog", "a1", "a2", "a3")


class LinearDepthHead(nn.Module):
    """[patch, cls] -> depth (B, 4h, 4w): 256 linearly normalised bins or a regression."""
    min_depth: float
    max_depth: float
    regression: bool = False

    @nn.compact
    def __call__(self, patch, cls, train):
        del train  # No batch norm: the reference's depth head has none.
        outputs = 1 if self.regression else NUM_BINS
        patch_layer = nn.Dense(outputs, name="patch")
        cls_logits = nn.Dense(outputs, use_bias=False, name="cls")(cls)[:, None, None, :]
        batch, height, width, _ = patch.shape
        logits = dense.resize_bilinear(patch_layer(patch) + cls_logits,
                                       (height * UPSAMPLE, width * UPSAMPLE))
        if self.regression:
            return jax.nn.relu(logits[..., 0]) + self.min_depth
        weights = jax.nn.relu(logits) + 0.1
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        bins = jnp.linspace(self.min_depth, self.max_depth, NUM_BINS)
        return jnp.einsum("bhwk,k->bhw", weights, bins)


def sigloss(prediction, target, step, warmup_steps=SIGLOSS_WARMUP):
    """The reference's SigLoss of (B, h, w) predictions resized to the (B, H, W) targets,
    over the pixels with target > 0; during warm-up only its mean term."""
    prediction = dense.resize_bilinear(prediction[..., None].astype(jnp.float32),
                                       target.shape[1:])[..., 0]
    valid = target > 0
    count = jnp.maximum(jnp.sum(valid), 2)
    g = jnp.where(valid, jnp.log(prediction + SIGLOSS_EPS) - jnp.log(target + SIGLOSS_EPS), 0.0)
    mean = jnp.sum(g) / count
    variance = jnp.sum(jnp.where(valid, (g - mean) ** 2, 0.0)) / (count - 1)  # torch.var
    warm = SIGLOSS_LAMBDA * mean ** 2
    return jnp.sqrt(jnp.where(step < warmup_steps, warm, variance + warm))


@jax.jit
def depth_metrics(prediction, target, valid):
    """The depth toolbox's metrics of one image over its `valid` pixels (float32 scalars)."""
    count = jnp.maximum(jnp.sum(valid), 1)

    def mean(x):
        return jnp.sum(jnp.where(valid, x, 0.0)) / count

    pred = jnp.where(valid, prediction, 1.0)
    gt = jnp.where(valid, target, 1.0)
    ratio = jnp.maximum(gt / pred, pred / gt)
    log_error = jnp.log(pred) - jnp.log(gt)
    return {
        "a1": mean(ratio < 1.25), "a2": mean(ratio < 1.25 ** 2), "a3": mean(ratio < 1.25 ** 3),
        "abs_rel": mean(jnp.abs(gt - pred) / gt), "sq_rel": mean((gt - pred) ** 2 / gt),
        "rmse": jnp.sqrt(mean((gt - pred) ** 2)), "rmse_log": jnp.sqrt(mean(log_error ** 2)),
        "log10": mean(jnp.abs(jnp.log10(gt) - jnp.log10(pred))),
        "silog": 100.0 * jnp.sqrt(jnp.maximum(mean(log_error ** 2) - mean(log_error) ** 2, 0.0)),
    }


def _identity(x):
    return x


def evaluate(model, params, train_source, val_source, *, image_size, batch_size=32,
             layers=1, regression=False, flip=False, stride=None,
             steps=dense.HEAD_STEPS, head_batch_size=dense.HEAD_BATCH_SIZE, lr=dense.HEAD_LR,
             weight_decay=dense.HEAD_WEIGHT_DECAY, warmup_steps=dense.HEAD_WARMUP_STEPS,
             train_scales=(1.0,), train_flip=False,
             random_window=True, cache_dtype=np.float32, num_workers=4, seed=0,
             keep_predictions=0, progress=True):
    """Trains the linear depth head on `train_source` and scores it on `val_source`.

    Returns (results, predictions): results a flat dict of floats ("depth/rmse",
    "depth/abs_rel", "depth/a1", ..., "depth/rmse_mean_baseline": the RMSE of predicting
    the training set's mean depth everywhere), predictions (val index, (H, W) metres) of the
    first `keep_predictions` scored images. `flip` averages mirrored test views.
    """
    train_source, val_source = (dense_data.open_dense_source(s) if isinstance(s, str) else s
                                for s in (train_source, val_source))
    for source in (train_source, val_source):
        if source.task != "depth":
            raise ConfigError(f"source {source.name!r} holds segmentation masks, not depth")
    min_depth, max_depth = val_source.min_depth, val_source.max_depth
    stride = stride or dense_data.default_stride(image_size)
    blocks = dense.block_indices(model.depth, layers, spread=True)
    common = dict(size=image_size, stride=stride, blocks=blocks, norm=False,
                  batch_size=batch_size, cache_dtype=cache_dtype, num_workers=num_workers,
                  seed=seed, progress=progress)
    train = dense.extract_windows(model, params, train_source, train=True, scales=train_scales,
                                  flip=train_flip, random_window=random_window,
                                  desc="depth train features", **common)
    known = train.targets > 0
    if not known.any():
        raise ConfigError(f"source {train_source.name!r}: no pixel has a depth")
    mean_depth = float(train.targets[known].mean())
    head = LinearDepthHead(train_source.min_depth, train_source.max_depth, regression)
    variables, train_loss = dense.train_head(
        head, sigloss, train, steps=steps, batch_size=head_batch_size, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, seed=seed, progress=progress,
        desc="depth head")
    train_skipped = train.skipped
    del train
    val = dense.extract_windows(model, params, val_source, train=False, flip=flip,
                                desc="depth val features", **common)
    variables = jax.device_get(variables)
    window_depth = dense.WindowMaps(head, model.patch_size, channel=True)
    totals = {name: 0.0 for name in METRICS}
    baseline, scored, predictions = 0.0, 0, []
    for index in tqdm.tqdm(sorted(val.views), desc="depth val", file=sys.stderr,
                           disable=not progress or jax.process_index() != 0):
        patch, cls, boxes, specs = dense.image_windows(val, index)
        _, target = val_source.load(index)
        valid = val_source.eval_mask(target)
        if not valid.any():
            continue
        prediction = dense.predict_image(variables, patch, cls, boxes, window_maps=window_depth,
                                         view_specs=specs, out_shape=target.shape,
                                         post=_identity)[..., 0]
        prediction = jnp.clip(prediction, min_depth, max_depth)
        metrics = depth_metrics(prediction, jnp.asarray(target), jnp.asarray(valid))
        for name in METRICS:
            totals[name] += float(metrics[name])
        constant = jnp.full(target.shape, np.clip(mean_depth, min_depth, max_depth))
        baseline += float(depth_metrics(constant, jnp.asarray(target), jnp.asarray(valid))["rmse"])
        scored += 1
        if len(predictions) < keep_predictions:
            predictions.append((index, np.asarray(prediction)))
    if not scored:
        raise ConfigError(f"source {val_source.name!r}: no image has a depth in "
                          f"({min_depth}, {max_depth}) to score")
    results = {f"depth/{name}": totals[name] / scored for name in METRICS}
    results.update({
        "depth/rmse_mean_baseline": baseline / scored,
        "depth/train_loss": train_loss,
        "depth/val_images": float(scored),
        "depth/skipped_pairs": float(train_skipped + val.skipped),
        "depth/unpaired_files": float(train_source.unpaired + val_source.unpaired),
    })
    return results, predictions


def _define(flag_values):
    dense.define_flags(flag_values, size=518, batch_size=32)
    flags.DEFINE_string("train", None, "training pairs: nyu:ROOT[:SPLIT_FILE], "
                        "depthfolder:ROOT", required=True, flag_values=flag_values)
    flags.DEFINE_string("val", None, "validation pairs", required=True, flag_values=flag_values)
    flags.DEFINE_enum("layers", "1", ("1", "4"), "blocks read: the last, or 4 evenly spaced",
                      flag_values=flag_values)
    flags.DEFINE_boolean("regression", False, "regress depth instead of 256 bins",
                         flag_values=flag_values)
    flags.DEFINE_boolean("flip", False, "average mirrored test views", flag_values=flag_values)
    dense.define_head_flags(flag_values)


def main(argv=None):
    args = cli.parse(argv, _define, "Linear depth probe (NYU-Depth-v2 protocol) of a backbone.")
    model, params = dense.load_model(args)
    results, _ = evaluate(
        model, params, args.train, args.val, image_size=args.size, batch_size=args.batch_size,
        layers=int(args.layers), regression=args.regression, flip=args.flip,
        **dense.head_arguments(args))
    dense.report(results, args, "depth", train=args.train, val=args.val,
                 layers=int(args.layers), regression=args.regression, steps=args.steps)


if __name__ == "__main__":
    cli.run(main)
