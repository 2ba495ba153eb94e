"""dinov2_jax.losses against the official dinov2 loss modules (fp32, fresh random inputs)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
dinov2_loss = pytest.importorskip("dinov2.loss")

from dinov2_jax import losses  # noqa: E402

RTOL = 1e-5  # fp32 on both sides, same formulas; observed differences are ~1e-7 relative
K = 64


from torch_process_group import single_process_group  # noqa: E402,F401 (autouse fixture)


def _t(x):
    return torch.from_numpy(np.array(x, np.float32))


def _logits(*shape):
    """Head-like logits: bounded like the reference's weight-normalised prototypes (|t| <~ 1)."""
    return np.random.uniform(-1, 1, shape).astype(np.float32)


def _probs(*shape):
    return np.asarray(jax.nn.softmax(np.random.randn(*shape) * 3, axis=-1))


def _assert_close(ours, ref, rtol=RTOL):
    ref = np.asarray(ref, np.float64)
    if ref.size == 0:
        assert np.size(ours) == 0
        return
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=rtol,
                               atol=rtol * np.abs(ref).max())


def test_softmax_centering_follows_the_reference_over_steps():
    b, temps = 4, (0.04, 0.05, 0.07)
    ref = dinov2_loss.DINOLoss(K)
    center = jnp.zeros(K)
    for temp in temps:
        t = _logits(2 * b, K)
        ref_probs = ref.softmax_center_teacher(_t(t), teacher_temp=temp)
        ref.update_center(_t(t))
        probs = losses.softmax_center(t, center, temp)
        center = losses.update_center(center, t)
        _assert_close(probs, ref_probs)
        np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-6)
    ref.apply_center_update()
    _assert_close(center, ref.center[0])


def test_ibot_softmax_centering_uses_the_mean_over_masked_rows():
    upperbound, temps = 24, (0.04, 0.06)
    ref = dinov2_loss.iBOTPatchLoss(K)
    center = jnp.zeros(K)
    for temp in temps:
        n_masked = np.random.randint(1, upperbound)
        buffer = _logits(upperbound, K)  # padding rows hold real (ignored) head outputs
        valid = np.arange(upperbound) < n_masked
        masked = _t(buffer[:n_masked]).unsqueeze(0)
        ref_probs = ref.softmax_center_teacher(masked, teacher_temp=temp).squeeze(0)
        ref.update_center(masked)
        probs = losses.softmax_center(buffer, center, temp)
        center = losses.update_center(center, buffer, valid=valid)
        _assert_close(probs[:n_masked], ref_probs)
    ref.apply_center_update()
    _assert_close(center, ref.center[0, 0])


def test_update_center_averages_group_means_and_skips_empty_groups():
    center = np.random.randn(K).astype(np.float32)
    t = _logits(3, 10, K)
    valid = np.zeros((3, 10), bool)
    valid[0, :4] = True
    valid[2, :9] = True  # group 1 is empty: left out of the average
    expected = 0.9 * center + 0.1 * (t[0, :4].mean(0) + t[2, :9].mean(0)) / 2
    _assert_close(losses.update_center(center, t, valid=valid), expected)
    _assert_close(losses.update_center(center, t, valid=np.zeros_like(valid)), center)


def test_sinkhorn_knopp_dino_matches_reference():
    t = _logits(16, K)
    ref = dinov2_loss.DINOLoss(K).sinkhorn_knopp_teacher(_t(t), teacher_temp=0.04)
    probs = losses.sinkhorn_knopp(t, 0.04)
    _assert_close(probs, ref)
    np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-6)


def test_sinkhorn_knopp_ibot_ignores_padding_rows():
    upperbound, n_masked = 40, 27
    buffer = _logits(upperbound, K)
    order = np.random.permutation(upperbound)  # padding rows anywhere, not only at the end
    valid = np.zeros(upperbound, bool)
    valid[order[:n_masked]] = True
    ref = dinov2_loss.iBOTPatchLoss(K).sinkhorn_knopp_teacher(
        _t(buffer[valid]), teacher_temp=0.07, n_masked_patches_tensor=torch.tensor(n_masked))
    probs = np.asarray(losses.sinkhorn_knopp(buffer, 0.07, valid=valid))
    _assert_close(probs[valid], ref)
    assert np.all(probs[~valid] == 0)


def test_sinkhorn_knopp_no_valid_rows_gives_zeros():
    probs = losses.sinkhorn_knopp(_logits(8, K), 0.04, valid=np.zeros(8, bool))
    assert np.all(np.asarray(probs) == 0)


def _reference_dino(s_global, s_local, t_probs):
    """The reference meta-arch's composition (ssl_meta_arch.forward_backward), spec §3.5."""
    dino = dinov2_loss.DINOLoss(K)
    n_local, b = s_local.shape[:2]
    n_terms = 2 + max(2 * n_local, 1)
    teacher_swapped = t_probs[[1, 0]]  # the reference swaps teacher crops before the head
    local = 0.0
    if n_local:
        local = dino(s_local.reshape(n_local * b, K).chunk(n_local), teacher_swapped) / n_terms
    glob = dino([s_global.reshape(2 * b, K)], [teacher_swapped.flatten(0, 1)]) * 2 / n_terms
    return local, glob


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_and_grads_match_reference(n_local):
    b = 5
    s_global, s_local = np.random.randn(2, b, K) * 2, np.random.randn(n_local, b, K) * 2
    t_probs = _probs(2, b, K)
    sg, sl = _t(s_global).requires_grad_(), _t(s_local).requires_grad_()
    ref_local, ref_global = _reference_dino(sg, sl, _t(t_probs))
    (ref_local + ref_global).backward()

    def total(sg, sl):
        return sum(losses.dino_loss(sg, sl, t_probs))

    local, glob = losses.dino_loss(s_global, s_local, t_probs)
    grads = jax.grad(total, argnums=(0, 1))(jnp.float32(s_global), jnp.float32(s_local))
    _assert_close(local, float(ref_local.detach()) if n_local else 0.0)
    _assert_close(glob, float(ref_global.detach()))
    _assert_close(grads[0], sg.grad)
    if n_local:
        _assert_close(grads[1], sl.grad)
    else:
        assert local == 0


def test_dino_loss_computes_in_float32_for_bf16_inputs():
    s_global = jnp.bfloat16(np.random.randn(2, 3, K))
    s_local = jnp.bfloat16(np.random.randn(2, 3, K))
    t_probs = _probs(2, 3, K)
    ours = losses.dino_loss(s_global, s_local, t_probs)
    upcast = losses.dino_loss(jnp.float32(s_global), jnp.float32(s_local), t_probs)
    assert ours[1].dtype == jnp.float32
    _assert_close(ours[0], upcast[0])
    _assert_close(ours[1], upcast[1])


def _masks(n_crops, n_patches, kind):
    if kind == "all":
        return np.ones((n_crops, n_patches), bool)
    if kind == "none":
        return np.zeros((n_crops, n_patches), bool)
    masks = np.random.rand(n_crops, n_patches) < np.random.uniform(0.1, 0.5, (n_crops, 1))
    masks[np.random.rand(n_crops) < 0.5] = False  # like the reference, half the crops unmasked
    return masks


@pytest.mark.parametrize("kind", ["random", "all", "none"])
def test_ibot_loss_and_grads_match_reference(kind):
    n_crops, n_patches, pad = 6, 9, 7
    masks = _masks(n_crops, n_patches, kind)
    n_masked = int(masks.sum())
    upperbound = n_masked + pad
    s = np.random.randn(upperbound, K).astype(np.float32) * 2  # buffer rows, padding at the end
    t = _probs(upperbound, K)
    weights = np.zeros(upperbound, np.float32)
    weights[:n_masked] = np.repeat(1 / np.maximum(masks.sum(1), 1), masks.sum(1))

    s_ref = _t(s[:n_masked]).requires_grad_()
    ref = dinov2_loss.iBOTPatchLoss(K).forward_masked(
        s_ref, _t(t[:n_masked]), student_masks_flat=torch.from_numpy(masks),
        n_masked_patches=n_masked)
    ref.backward()
    loss, grads = jax.value_and_grad(losses.ibot_loss)(jnp.float32(s), t, weights, n_crops)
    _assert_close(loss, float(ref.detach()))
    _assert_close(grads[:n_masked], s_ref.grad)
    assert np.all(np.asarray(grads[n_masked:]) == 0)
    if kind == "none":
        assert loss == 0


def test_koleo_loss_and_grads_match_reference():
    x = np.random.randn(12, 16).astype(np.float32)
    x_ref = _t(x).requires_grad_()
    ref = dinov2_loss.KoLeoLoss()(x_ref)
    ref.backward()
    loss, grads = jax.value_and_grad(losses.koleo_loss)(jnp.float32(x))
    _assert_close(loss, float(ref.detach()))
    _assert_close(grads, x_ref.grad)


def test_koleo_loss_is_finite_with_duplicate_rows():
    x = np.random.randn(10, 16).astype(np.float32)
    x[4] = x[1]
    x[7] = x[1]
    ref = float(dinov2_loss.KoLeoLoss()(_t(x)))
    loss = losses.koleo_loss(x)
    assert np.isfinite(loss) and np.isfinite(ref)
    _assert_close(loss, ref)


def test_koleo_loss_batches_over_leading_axes():
    x = np.random.randn(2, 3, 8, 16).astype(np.float32)
    batched = losses.koleo_loss(x)
    assert batched.shape == (2, 3)
    _assert_close(batched[1, 2], losses.koleo_loss(x[1, 2]))


SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dinov2_jax import losses

    mesh = jax.make_mesh((4,), ("data",))
    K = 32

    def rel_err(a, b):
        return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())

    def sharded(fn, in_specs, out_specs):
        run = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))
        put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
        return lambda *args: run(*map(put, args, in_specs))

    cls_logits = np.random.uniform(-1, 1, (16, K)).astype(np.float32)
    sk = lambda t: losses.sinkhorn_knopp(t, 0.04, axis_name="data")
    dino = sharded(sk, (P("data"),), P("data"))(cls_logits)

    buffer = np.random.uniform(-1, 1, (4, 10, K)).astype(np.float32)
    valid = np.random.rand(4, 10) < 0.6
    valid[1] = False  # one device holds only padding
    sk_masked = lambda t, v: losses.sinkhorn_knopp(t, 0.07, valid=v, axis_name="data")
    ibot = sharded(sk_masked, (P("data"), P("data")), P("data"))(buffer, valid)

    center = np.random.randn(K).astype(np.float32)
    upd = lambda c, t, v: losses.update_center(c, t, valid=v, axis_name="data")
    new_center = sharded(upd, (P(), P("data"), P("data")), P())(center, buffer, valid)
    print(json.dumps({
        "dino_sk": rel_err(dino, losses.sinkhorn_knopp(cls_logits, 0.04)),
        "ibot_sk": rel_err(ibot, losses.sinkhorn_knopp(buffer, 0.07, valid=valid)),
        "ibot_sk_padding_max": float(np.abs(np.asarray(ibot)[~valid]).max()),
        "center": rel_err(new_center, losses.update_center(center, buffer, valid=valid)),
    }))
""")


def test_sharded_sinkhorn_knopp_and_center_equal_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert errors["ibot_sk_padding_max"] == 0
    for name in ("dino_sk", "ibot_sk", "center"):
        assert errors[name] < 1e-6, errors  # only the summation order differs
