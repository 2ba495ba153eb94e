"""DINOv3 objectives and schedules against NumPy float64 transcriptions of the dinov3 code.

Transcribed: `dinov3/loss/gram_loss.py` (GramLoss), `dinov3/loss/dino_clstoken_loss.py`
(DINOLoss.forward with ignore_diagonal), `dinov3/loss/koleo_loss.py` (KoLeoLossDistributed, one
rank at a time), `dinov3/train/cosine_lr_scheduler.py` (linear_warmup_cosine_decay) and the
Gram-teacher patch resize of `dinov3/train/ssl_meta_arch.py` (torch's bicubic interpolate).
Inputs are fresh random draws.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax import losses
from dinov2_jax.train import schedules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 against float64, same formulas: sums of at most a few thousand terms lose ~1e-6
# relative; 1e-5 leaves a margin.
RTOL = 1e-5


def _assert_close(ours, ref, rtol=RTOL):
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=rtol,
                               atol=rtol * np.abs(ref).max())


# ------------------------------------------------------------------ transcriptions (float64)


def _np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_gram_loss(output_feats, target_feats, img_level, apply_norm=True, remove_neg=False,
                  remove_only_teacher_neg=False):
    """GramLoss.forward, line by line, in float64."""
    output_feats, target_feats = np.float64(output_feats), np.float64(target_feats)
    if apply_norm:
        target_feats = _np_normalize(target_feats)
    if not img_level:
        target_feats = target_feats.reshape(-1, target_feats.shape[-1])
    target_sim = target_feats @ np.swapaxes(target_feats, -1, -2)
    if apply_norm:
        output_feats = _np_normalize(output_feats)
    if not img_level:
        output_feats = output_feats.reshape(-1, output_feats.shape[-1])
    student_sim = output_feats @ np.swapaxes(output_feats, -1, -2)
    if remove_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
    elif remove_only_teacher_neg:
        target_sim[target_sim < 0] = 0.0
        student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0
    return np.mean((student_sim - target_sim) ** 2)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_dino_loss(student_logits, teacher_probs, ignore_diagonal, student_temp=0.1):
    """DINOLoss.forward (dinov3), in float64."""
    s_crops, batch, _ = student_logits.shape
    t_crops = teacher_probs.shape[0]
    log_p = _np_log_softmax(np.float64(student_logits) / student_temp)
    loss = -np.einsum("sbk,tbk->st", log_p, np.float64(teacher_probs))
    if not ignore_diagonal:
        return loss.sum() / (batch * s_crops * t_crops)
    min_st = min(s_crops, t_crops)
    loss[np.arange(min_st), np.arange(min_st)] = 0
    return loss.sum() / (batch * s_crops * t_crops - batch * min_st)


def _np_koleo_distributed(all_rows, world, group_size, topk, eps=1e-8):
    """KoLeoLossDistributed.forward on every rank of `world`, then the mean over ranks."""
    all_rows = np.float64(all_rows)
    all_rows = all_rows / np.maximum(np.linalg.norm(all_rows, axis=-1, keepdims=True), eps)
    global_b = len(all_rows)
    local_b = global_b // world
    group_size = group_size or global_b
    n_groups = global_b // group_size
    ranks_per_group = world // n_groups
    rank_losses = []
    for rank in range(world):
        x = all_rows[rank * local_b:(rank + 1) * local_b]
        group = all_rows.reshape(n_groups, group_size, -1)[rank // ranks_per_group]
        dots = x @ group.T
        flat = dots.reshape(-1)
        flat[(rank % ranks_per_group) * local_b::group_size + 1] = -1
        indices = np.argsort(-dots, axis=1, kind="stable")[:, :topk]
        expanded = np.repeat(x, topk, axis=0)
        distances = np.linalg.norm(expanded - group[indices].reshape(-1, x.shape[1]) + eps,
                                   axis=-1)
        rank_losses.append(-np.log(distances + eps).mean())
    return np.mean(rank_losses)


def _np_linear_warmup_cosine_decay(start, peak, end, warmup, total, cosine=None):
    linear = np.linspace(start, peak, warmup, endpoint=False)
    if cosine is None:
        cosine = total - warmup
    cos = (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2
    cos = (peak - end) * cos + end
    return np.concatenate([linear, cos, np.full((total - cosine - warmup,), end)])


# ------------------------------------------------------------------ Gram loss


def _patches(batch, patches, dim):
    """Patch features with a common direction, so that similarities are mostly positive but
    some are negative (the remove-negatives options then change the result)."""
    common = np.random.randn(1, 1, dim)
    return np.float32(np.random.randn(batch, patches, dim) + 0.7 * common)


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("neg", ["keep", "remove_neg", "remove_only_teacher_neg"])
def test_gram_loss_matches_transcription(img_level, neg):
    student, teacher = _patches(3, 20, 16), _patches(3, 20, 16)
    options = {neg: True} if neg != "keep" else {}
    ours = losses.gram_loss(student, teacher, img_level=img_level, **options)
    ref = _np_gram_loss(student, teacher, img_level, **options)
    _assert_close(ours, ref)


def test_gram_loss_without_normalisation_and_options_change_the_value():
    student, teacher = _patches(2, 12, 8), _patches(2, 12, 8)
    # Certain negative similarities in both (with 8 dims a draw can have none in the teacher,
    # and then remove_only_teacher_neg computes the plain value): opposite patch pairs.
    teacher[:, 0], student[:, 0] = -teacher[:, 1], -student[:, 2]
    _assert_close(losses.gram_loss(student, teacher, normalize=False),
                  _np_gram_loss(student, teacher, True, apply_norm=False))
    values = {neg: float(losses.gram_loss(student, teacher, **({neg: True} if neg else {})))
              for neg in ("", "remove_neg", "remove_only_teacher_neg")}
    assert len(set(values.values())) == 3, values  # each option computes something else


def test_gram_loss_batch_level_groups_are_per_device_local_batches():
    student, teacher = _patches(4, 10, 8), _patches(4, 10, 8)
    grouped = losses.gram_loss(student, teacher, img_level=False, groups=2)
    halves = [_np_gram_loss(student[i:i + 2], teacher[i:i + 2], False) for i in (0, 2)]
    _assert_close(grouped, np.mean(halves))


def test_gram_loss_is_zero_for_equal_features_and_has_gradients():
    student = _patches(2, 9, 8)
    assert float(losses.gram_loss(student, student)) < 1e-12
    grads = jax.grad(losses.gram_loss)(jnp.asarray(student), jnp.asarray(_patches(2, 9, 8)))
    assert np.all(np.isfinite(grads)) and np.abs(grads).max() > 0


def test_gram_loss_rejects_bad_input():
    x = _patches(2, 4, 8)
    with pytest.raises(ValueError, match="at most one"):
        losses.gram_loss(x, x, remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError, match="must both be"):
        losses.gram_loss(x, x[:, :3])
    with pytest.raises(ValueError, match="do not split"):
        losses.gram_loss(x, x, img_level=False, groups=3)


# ------------------------------------------------------------------ DINO loss over crop pairs


def _probs(*shape):
    return np.asarray(jax.nn.softmax(np.random.randn(*shape) * 3, axis=-1))


@pytest.mark.parametrize("n_student, ignore_diagonal", [(2, True), (2, False), (6, False),
                                                        (3, True)])
def test_dino_pairs_loss_matches_transcription(n_student, ignore_diagonal):
    student = np.float32(np.random.uniform(-1, 1, (n_student, 5, 32)))
    teacher = np.float32(_probs(2, 5, 32))
    ours = losses.dino_pairs_loss(student, teacher, ignore_diagonal=ignore_diagonal)
    _assert_close(ours, _np_dino_loss(student, teacher, ignore_diagonal))


def test_dino_pairs_loss_with_ignored_diagonal_is_dinov2s_split_loss():
    """With same-view pairs ignored, DINOv3's weighted global + local terms are DINOv2's."""
    n_local, batch = 4, 6
    student_global = np.float32(np.random.uniform(-1, 1, (2, batch, 32)))
    student_local = np.float32(np.random.uniform(-1, 1, (n_local, batch, 32)))
    teacher = np.float32(_probs(2, batch, 32))
    local_v2, global_v2 = losses.dino_loss(student_global, student_local, teacher)
    global_scale, local_scale = losses.dino_loss_scales(2, n_local, ignore_diagonal=True)
    _assert_close(global_scale * losses.dino_pairs_loss(student_global, teacher, True), global_v2)
    _assert_close(local_scale * losses.dino_pairs_loss(student_local, teacher), local_v2)


def test_dino_loss_scales():
    assert losses.dino_loss_scales(2, 8, ignore_diagonal=True) == (2 / 18, 16 / 18)
    assert losses.dino_loss_scales(2, 8, ignore_diagonal=False) == (4 / 20, 16 / 20)


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("args", [
    (0.0, 1e-3, 1e-6, 10, 100, None),    # warm-up then cosine to the end
    (0.0, 5e-5, 5e-5, 7, 40, 0),         # warm-up then constant (7B pretraining lr)
    (0.0, 1.25e-5, 1.25e-5, 0, 60, 20),  # cosine then a constant tail
    (1.0, 1.0, 0.5, 30, 50, 1),          # 7B local-crop weight: 1, then one step at peak, 0.5
    (0.04, 0.04, 0.04, 0, 25, None),     # constant
])
def test_warmup_cosine_constant_matches_transcription(args):
    schedule = jax.jit(schedules.warmup_cosine_constant(*args))
    ref = _np_linear_warmup_cosine_decay(*args)
    ours = np.asarray([schedule(step) for step in range(len(ref))])
    # float32 steps and cosines: the relative error is a few float32 ulps (< 1e-5 observed
    # 5e-6 where the cosine ends at 1e-6 and base - end terms cancel)
    _assert_close(ours, ref)
    assert float(schedule(len(ref) + 3)) == pytest.approx(args[2], rel=1e-6)


def test_weight_schedule_reads_dinov3_blocks_in_epochs():
    """The 7B Gram-anchoring weight: 0 for the pretraining epochs, a cosine up to 2.0, constant."""
    spec = dict(start=0.0, peak=0.0, end=2.0, warmup_epochs=3, cosine_epochs=1)
    schedule = schedules.weight_schedule(spec, epoch_length=10, total_steps=60)
    ref = _np_linear_warmup_cosine_decay(0.0, 0.0, 2.0, 30, 60, 10)
    _assert_close([schedule(step) for step in range(60)], ref)
    whole = schedules.weight_schedule(dict(start=0.5, peak=1.0, end=0.1, warmup_epochs=1),
                                      epoch_length=4, total_steps=20)
    _assert_close([whole(step) for step in range(20)],
                  _np_linear_warmup_cosine_decay(0.5, 1.0, 0.1, 4, 20))


def test_warmup_cosine_constant_rejects_too_many_steps():
    with pytest.raises(ValueError, match="at most total_steps"):
        schedules.warmup_cosine_constant(0, 1, 0, 10, 20, cosine_steps=15)


# ------------------------------------------------------------------ distributed KoLeo

KOLEO_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from dinov2_jax import losses

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x = np.random.RandomState(int(__import__("sys").argv[1])).randn(32, 16).astype(np.float32)
    results = {}
    for group_size, topk in ((None, 1), (8, 1), (16, 2), (4, 3)):
        fn = lambda rows: losses.koleo_loss_distributed(rows, axis_name="data",
                                                        group_size=group_size, topk=topk)
        run = jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P())
        sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
        value, grads = jax.jit(jax.value_and_grad(run))(sharded)
        results[f"{group_size}_{topk}"] = [float(value), np.asarray(grads).tolist()]
    # groups of 8 rows, k = 1: the plain KoLeo of each group of consecutive rows, averaged
    plain = lambda r: jnp.mean(losses.koleo_loss(r.reshape(4, 8, 16)))
    value, grads = jax.value_and_grad(plain)(jnp.asarray(x))
    results["plain_8"] = [float(value), np.asarray(grads).tolist()]
    print("RESULTS" + json.dumps(results))
""")


def test_distributed_koleo_over_device_groups_matches_transcription():
    seed = np.random.randint(2**31)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", KOLEO_SCRIPT, str(seed)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.split("RESULTS", 1)[1])
    x = np.random.RandomState(seed).randn(32, 16).astype(np.float32)
    for key, (value, _) in results.items():
        if key.startswith("plain"):
            continue
        group_size, topk = key.split("_")
        ref = _np_koleo_distributed(x, 8, None if group_size == "None" else int(group_size),
                                    int(topk))
        _assert_close(value, ref)
    # the same loss and gradients as KoLeo on groups of consecutive rows of the global batch
    _assert_close(results["8_1"][0], results["plain_8"][0])
    _assert_close(results["8_1"][1], results["plain_8"][1])


def test_distributed_koleo_on_one_device_is_koleo():
    x = np.float32(np.random.randn(12, 16))
    _assert_close(losses.koleo_loss_distributed(x), losses.koleo_loss(x))
    with pytest.raises(ValueError, match="multiple of the local batch"):
        losses.koleo_loss_distributed(x, group_size=5)


# ------------------------------------------------------------------ Gram teacher resize


@pytest.mark.parametrize("antialias", [False, True])
def test_gram_teacher_patches_resize_like_torch_bicubic(antialias):
    """2x Gram-teacher crops: its 8x6 patch map down to the student's 4x3 grid (and a
    non-integer ratio), as the reference's F.interpolate(bicubic, align_corners=False)."""
    torch = pytest.importorskip("torch")
    for grid, out_grid in (((8, 6), (4, 3)), ((7, 5), (4, 3))):
        patches = np.float32(np.random.randn(2, grid[0] * grid[1], 16))
        ours = losses.resize_patch_tokens(patches, grid, out_grid, antialias=antialias)
        hw = torch.from_numpy(patches).transpose(-2, -1).unflatten(-1, grid)
        ref = torch.nn.functional.interpolate(hw, size=out_grid, mode="bicubic",
                                              align_corners=False, antialias=antialias)
        ref = ref.flatten(-2, -1).transpose(-2, -1).numpy()
        # fp32 on both sides, 16 taps per output: ~1e-7 relative
        _assert_close(ours, ref)
    with pytest.raises(ValueError, match="not a 3x3 grid"):
        losses.resize_patch_tokens(patches, (3, 3), (2, 2))
