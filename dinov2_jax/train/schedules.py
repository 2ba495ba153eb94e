"""Per-iteration schedules of DINOv2 training (docs/reference.md, Schedules), as optax schedules.

`make_schedules(config)` returns the learning rate, last-layer learning rate, weight decay,
teacher EMA momentum and teacher temperature, each a jit-able function step -> float32 value
equal to the reference's `CosineScheduler` array at that iteration (and its final value past
the end), or with `schedules.version="dinov3"` DINOv3's warm-up / cosine / constant schedules
(`dinov3/train/train.py:build_schedulers_v2`); and the DINOv3 loss weights of the local-crop
DINO term and of the Gram loss (constants unless a schedule block is set).
"""
import math
from typing import Callable, NamedTuple

import jax.numpy as jnp
import optax


class Schedules(NamedTuple):
    lr: Callable
    last_layer_lr: Callable
    weight_decay: Callable
    momentum: Callable
    teacher_temp: Callable
    dino_local_weight: Callable = None  # DINOv3's dino.local_loss_weight_schedule, else 1
    gram_weight: Callable = None  # DINOv3's gram.loss_weight_schedule, else gram.loss_weight


def cosine_schedule(base_value, final_value, total_steps, warmup_steps=0,
                    start_warmup_value=0.0):
    """The reference's CosineScheduler (without freeze) as an optax schedule.

    Steps [0, warmup): linspace(start_warmup_value, base_value, warmup) with the endpoint
    included; then final + (base - final) * (1 + cos(pi * i / T)) / 2 for i in [0, T),
    T = total - warmup; final_value from total_steps on.
    """
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}]")
    decay_steps = total_steps - warmup_steps
    pieces, boundaries = [], []
    if warmup_steps > 0:
        # reaches base_value at step warmup - 1 (linspace endpoint); one step: only the start
        pieces.append(optax.linear_schedule(start_warmup_value, base_value,
                                            max(warmup_steps - 1, 1)))
        boundaries.append(warmup_steps)
    if decay_steps > 0:
        half_cosine = optax.cosine_decay_schedule(1.0, decay_steps)
        pieces.append(lambda i: final_value + (base_value - final_value) * half_cosine(i))
        boundaries.append(total_steps)
    pieces.append(optax.constant_schedule(final_value))
    return optax.join_schedules(pieces, boundaries)


def scaled_lr(base_lr, global_batch_size, scaling_rule):
    """Peak learning rate from the per-1024-images base_lr (docs/reference.md, Schedules)."""
    if scaling_rule != "sqrt_wrt_1024":
        raise ValueError(f"optim.scaling_rule={scaling_rule!r} is not supported; the reference "
                         "implements only 'sqrt_wrt_1024'")
    return base_lr * math.sqrt(global_batch_size / 1024)


def make_schedules(config):
    """All schedules of a run from config.optim, config.teacher and config.train.

    Total steps = optim.epochs * train.epoch_length; train.batch_size is the global batch.
    """
    optim, teacher, epoch_length = config.optim, config.teacher, config.train.epoch_length
    total_steps = optim.epochs * epoch_length
    freeze_steps = optim.freeze_last_layer_epochs * epoch_length
    weights = _loss_weights(config, epoch_length, total_steps)
    if config.schedules.version == "dinov3":
        blocks = config.schedules
        # DINOv3's sqrt_wrt_1024 has a factor 4 that DINOv2's base_lr holds (0.004 = 4 x 0.001)
        factor = 4 * scaled_lr(1.0, config.train.batch_size, optim.scaling_rule)
        start, peak, end, warmup, cosine = blocks.lr
        lr = weight_schedule(dict(start=start * factor, peak=peak * factor, end=end * factor,
                                  warmup_epochs=warmup, cosine_epochs=cosine),
                             epoch_length, total_steps)
        block = lambda name: weight_schedule(_block_dict(blocks[name]), epoch_length, total_steps)
        return Schedules(
            lr=lr, last_layer_lr=lambda step: jnp.where(step < freeze_steps, 0.0, lr(step)),
            weight_decay=block("weight_decay"), momentum=block("momentum"),
            teacher_temp=block("teacher_temp"), **weights)
    peak_lr = scaled_lr(optim.base_lr, config.train.batch_size, optim.scaling_rule)
    lr = cosine_schedule(peak_lr, optim.min_lr, total_steps, optim.warmup_epochs * epoch_length)
    teacher_warmup_steps = teacher.warmup_teacher_temp_epochs * epoch_length
    return Schedules(
        lr=lr,
        last_layer_lr=lambda step: jnp.where(step < freeze_steps, 0.0, lr(step)),
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, total_steps),
        momentum=cosine_schedule(teacher.momentum_teacher, teacher.final_momentum_teacher,
                                 total_steps),
        teacher_temp=cosine_schedule(teacher.teacher_temp, teacher.teacher_temp,
                                     teacher_warmup_steps, teacher_warmup_steps,
                                     teacher.warmup_teacher_temp),
        **weights,
    )


def _block_dict(block):
    """(start, peak, end, warmup_epochs, cosine_epochs) -> the weight_schedule dict."""
    return dict(zip(("start", "peak", "end", "warmup_epochs", "cosine_epochs"), block))


def _loss_weights(config, epoch_length, total_steps):
    """The local-crop DINO weight and the Gram weight: schedules or constants."""
    def weight(block, constant):
        if tuple(block):
            return weight_schedule(_block_dict(block), epoch_length, total_steps)
        return optax.constant_schedule(constant)
    return dict(dino_local_weight=weight(config.dino.local_loss_weight_schedule, 1.0),
                gram_weight=weight(config.gram.loss_weight_schedule, config.gram.loss_weight))


def warmup_cosine_constant(start, peak, end, warmup_steps, total_steps, cosine_steps=None):
    """DINOv3's `linear_warmup_cosine_decay` ("schedules v2") as an optax schedule.

    Steps [0, warmup): linspace(start, peak, warmup) without the endpoint; then `cosine_steps`
    (default: all the rest) values end + (peak - end) * (1 + cos(pi * j / (cosine_steps - 1))) / 2,
    j = 0 .. cosine_steps - 1, which reach `end` on the last; then `end`, the constant tail, up
    to total_steps and past it. start == peak == end is a constant schedule.
    """
    if cosine_steps is None:
        cosine_steps = total_steps - warmup_steps
    if min(warmup_steps, cosine_steps) < 0 or warmup_steps + cosine_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} + cosine_steps={cosine_steps} must be "
                         f"non-negative and at most total_steps={total_steps}")
    pieces, boundaries = [], []
    if warmup_steps > 0:
        pieces.append(optax.linear_schedule(start, peak, warmup_steps))
        boundaries.append(warmup_steps)
    if cosine_steps > 1:
        half_cosine = optax.cosine_decay_schedule(1.0, cosine_steps - 1)
        pieces.append(lambda i: end + (peak - end) * half_cosine(i))
        boundaries.append(warmup_steps + cosine_steps)
    elif cosine_steps == 1:  # linspace(0, pi, 1) == [0]: one step at the peak
        pieces.append(optax.constant_schedule(peak))
        boundaries.append(warmup_steps + 1)
    pieces.append(optax.constant_schedule(end))
    return optax.join_schedules(pieces, boundaries)


def weight_schedule(spec, epoch_length, total_steps):
    """A DINOv3 schedule block {start, peak, end, warmup_epochs[, cosine_epochs]} in epochs.

    The form of `dino.local_loss_weight_schedule` and `gram.loss_weight_schedule`; a missing or
    negative `cosine_epochs` means the cosine runs to `total_steps`.
    """
    cosine_epochs = spec.get("cosine_epochs", -1)
    return warmup_cosine_constant(
        spec["start"], spec["peak"], spec["end"], spec["warmup_epochs"] * epoch_length,
        total_steps, None if cosine_epochs is None or cosine_epochs < 0
        else cosine_epochs * epoch_length)
