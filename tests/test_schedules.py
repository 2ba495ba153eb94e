"""dinov2_jax.train.schedules against the reference's CosineScheduler arrays and spec §11.3."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

utils = pytest.importorskip("dinov2.utils.utils")

from dinov2_jax import configs  # noqa: E402
from dinov2_jax.train import schedules  # noqa: E402

# The schedules run in float32 (the reference: float64 numpy). Near the end of the cosine the
# value is final + (base - final) * (1 + cos x) / 2 with 1 + cos x far below float32's
# resolution of 1, so the error is absolute, a few ulps of the largest term.
F32_EPS = float(np.finfo(np.float32).eps)


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(
        train=dict(batch_size=512, epoch_length=10),
        optim=dict(epochs=30, warmup_epochs=4, base_lr=0.004, min_lr=1e-6, weight_decay=0.04,
                   weight_decay_end=0.4, freeze_last_layer_epochs=1,
                   scaling_rule="sqrt_wrt_1024"),
        teacher=dict(momentum_teacher=0.992, final_momentum_teacher=1.0,
                     warmup_teacher_temp=0.04, teacher_temp=0.07,
                     warmup_teacher_temp_epochs=12),
        # the DINOv3 sections at their defaults (DINOv2 schedules, constant loss weights)
        **{name: configs.default_config()[name].to_dict() for name in ("dino", "gram",
                                                                         "schedules")},
    ))
    config.update_from_flattened_dict(overrides)
    return config


def _reference_schedules(config):
    """The reference's train.build_schedulers (not importable without fvcore), on our config."""
    epoch, optim, teacher = config.train.epoch_length, config.optim, config.teacher
    total = optim.epochs * epoch
    lr = dict(base_value=optim.base_lr * np.sqrt(config.train.batch_size / 1024),
              final_value=optim.min_lr, total_iters=total,
              warmup_iters=optim.warmup_epochs * epoch, start_warmup_value=0)
    last_layer_lr = utils.CosineScheduler(**lr)
    last_layer_lr.schedule[:optim.freeze_last_layer_epochs * epoch] = 0
    warmup_temp = teacher.warmup_teacher_temp_epochs * epoch
    return dict(
        lr=utils.CosineScheduler(**lr),
        last_layer_lr=last_layer_lr,
        weight_decay=utils.CosineScheduler(optim.weight_decay, optim.weight_decay_end, total),
        momentum=utils.CosineScheduler(teacher.momentum_teacher, teacher.final_momentum_teacher,
                                       total),
        teacher_temp=utils.CosineScheduler(teacher.teacher_temp, teacher.teacher_temp,
                                           warmup_temp, warmup_temp, teacher.warmup_teacher_temp),
    )


def _assert_f32_close(ours, ref, scale):
    np.testing.assert_allclose(ours, ref, rtol=4 * F32_EPS, atol=4 * F32_EPS * scale)


def test_every_schedule_equals_reference_at_every_iteration():
    config = _config()
    ours = schedules.make_schedules(config)
    ref = _reference_schedules(config)
    steps = jnp.arange(330)  # 300 iterations and 30 past the end
    for name, ref_schedule in ref.items():
        values = np.asarray(jax.jit(jax.vmap(getattr(ours, name)))(steps))
        expected = np.array([ref_schedule[int(i)] for i in steps])
        assert values.dtype == np.float32
        _assert_f32_close(values, expected, np.abs(expected).max())
    last_layer_lr = np.asarray(jax.vmap(ours.last_layer_lr)(steps))
    assert np.all(last_layer_lr[:10] == 0) and np.all(last_layer_lr[10:] > 0)


def test_short_run_without_warmup_or_decay_steps():
    config = _config(**{"optim.warmup_epochs": 0, "optim.epochs": 1,
                        "teacher.warmup_teacher_temp_epochs": 0})
    ours = schedules.make_schedules(config)
    ref = _reference_schedules(config)
    for name, ref_schedule in ref.items():
        for step in (0, 1, 9, 10, 50):
            _assert_f32_close(getattr(ours, name)(step), ref_schedule[step], 1.0)


VITL16_SHORT_32_GPUS = dict(**{
    "train.batch_size": 2048, "train.epoch_length": 1250, "optim.epochs": 100,
    "optim.warmup_epochs": 10, "teacher.warmup_teacher_temp_epochs": 30})

SPEC_11_3 = {
    "lr": {0: 0.0, 1: 4.5258454672e-07, 624: 2.8241275716e-04, 12498: 0.0056564017,
           12499: 0.0056568542, 12500: 0.0056568542, 68750: 0.0028289271,
           124999: 1.0000011026e-06, 125000: 1e-6, 200000: 1e-6},
    "weight_decay": {0: 0.04, 62500: 0.22, 125000: 0.4, 130000: 0.4},
    "momentum": {0: 0.992, 62500: 0.996},
    "teacher_temp": {0: 0.04, 1: 0.0400008000, 18749: 0.0549996000, 37498: 0.0699992000,
                     37499: 0.07, 50000: 0.07},
    "last_layer_lr": {0: 0.0, 1249: 0.0, 1250: 0.0056568542 * 1250 / 12499},
}


def test_spec_values_for_vitl16_short_on_32_gpus():
    ours = schedules.make_schedules(_config(**VITL16_SHORT_32_GPUS))
    assert schedules.scaled_lr(0.004, 2048, "sqrt_wrt_1024") == pytest.approx(
        0.005656854249492381, rel=1e-15)
    for name, values in SPEC_11_3.items():
        scale = max(values.values())
        for step, expected in values.items():
            value = float(jax.jit(getattr(ours, name))(step))
            # spec values have 8-11 significant digits; float32 adds ~1e-7 relative
            assert value == pytest.approx(expected, rel=2e-7, abs=4 * F32_EPS * scale), (name, step)


def test_unknown_scaling_rule_is_rejected():
    with pytest.raises(ValueError, match="scaling_rule"):
        schedules.make_schedules(_config(**{"optim.scaling_rule": "linear_wrt_256"}))
