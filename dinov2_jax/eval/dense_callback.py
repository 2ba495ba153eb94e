"""The dense probes as one call for the train loop's evaluations (`evaluation.every`).

`evaluate(model, params, ...)` runs the linear segmentation probe when both segmentation
sources are given and the linear depth probe when both depth sources are, on the backbone as
it is, and returns their flat metrics ("segmentation/mIoU", "depth/rmse", ...) for
metrics.jsonl. The heads train on cached window features, so at the demo's scale this takes
about a minute on a CPU. Defaults are the probes' protocols with fewer head steps.
"""
from dinov2_jax.configs import ConfigError
from dinov2_jax.eval import depth, segmentation

STEPS = 1_000
HEAD_BATCH_SIZE = 16
LEARNING_RATE = 1e-3
WARMUP_STEPS = 100


def evaluate(model, params, *, segmentation_train="", segmentation_val="", depth_train="",
             depth_val="", image_size, batch_size=32, steps=STEPS,
             head_batch_size=HEAD_BATCH_SIZE, lr=LEARNING_RATE, warmup_steps=WARMUP_STEPS,
             progress=True):
    """{"segmentation/mIoU", ..., "depth/rmse", ...} of the probes whose sources are set.

    `image_size` is the window side (a multiple of the patch size), `batch_size` the windows
    per backbone forward; the head settings apply to both probes."""
    for name, (train, val) in {"segmentation": (segmentation_train, segmentation_val),
                               "depth": (depth_train, depth_val)}.items():
        if bool(train) != bool(val):
            raise ConfigError(f"evaluation.{name}_train and evaluation.{name}_val must be set "
                              f"together (got {train!r} and {val!r})")
    head = dict(image_size=image_size, batch_size=batch_size, steps=steps,
                head_batch_size=head_batch_size, lr=lr, warmup_steps=min(warmup_steps, steps),
                progress=progress)
    results = {}
    if segmentation_train:
        results.update(segmentation.evaluate(model, params, segmentation_train,
                                             segmentation_val, **head)[0])
    if depth_train:
        results.update(depth.evaluate(model, params, depth_train, depth_val, **head)[0])
    return results
