"""DINOv3 model options: axial RoPE (against a float64 transcription of
`dinov3/layers/rope_position_encoding.py` and `rope_apply` of `dinov3/layers/attention.py`),
and the backbone options, each off by default."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax.models import rope

# float32 sin/cos of angles up to 2 pi * 2 (rescaled coords) / 0.01 ... ~1e3 rad: float32
# argument rounding alone is ~1e3 * 6e-8 = 6e-5 absolute on the tables.
TABLE_ATOL = 1e-4


def _np_rope_tables(grid_h, grid_w, head_dim, base=100.0, normalize="separate"):
    """RopePositionEmbedding.forward at eval, float64: (sin, cos), each (HW, head_dim)."""
    n = head_dim // 4
    periods = base ** (2 * np.arange(n) / (head_dim // 2))
    denom_h, denom_w = {"separate": (grid_h, grid_w), "min": (min(grid_h, grid_w),) * 2,
                        "max": (max(grid_h, grid_w),) * 2}[normalize]
    coords_h = np.arange(0.5, grid_h) / denom_h
    coords_w = np.arange(0.5, grid_w) / denom_w
    coords = np.stack(np.meshgrid(coords_h, coords_w, indexing="ij"), -1).reshape(-1, 2)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = np.tile(angles.reshape(len(coords), -1), 2)
    return np.sin(angles), np.cos(angles)


@pytest.mark.parametrize("normalize", ["separate", "min", "max"])
def test_rope_tables_match_transcription_on_a_non_square_grid(normalize):
    settings = rope.Rope(head_dim=16, normalize=normalize)
    sin, cos = settings.tables(3, 5, num_prefix=2)
    ref_sin, ref_cos = _np_rope_tables(3, 5, 16, normalize=normalize)
    np.testing.assert_allclose(sin[2:], ref_sin, atol=TABLE_ATOL)
    np.testing.assert_allclose(cos[2:], ref_cos, atol=TABLE_ATOL)
    assert np.all(sin[:2] == 0) and np.all(cos[:2] == 1)  # prefix tokens: identity


def test_rope_periods_base_and_min_max():
    np.testing.assert_allclose(rope.periods(32), 100.0 ** (2 * np.arange(8) / 16), rtol=1e-6)
    np.testing.assert_allclose(rope.periods(16, None, 0.5, 8.0),
                               0.5 * 16 ** np.linspace(0, 1, 4), rtol=1e-6)
    rounded = rope.periods(64, dtype="bfloat16")
    assert np.array_equal(rounded, np.asarray(jnp.asarray(rope.periods(64), jnp.bfloat16),
                                              np.float32))
    assert not np.array_equal(rounded, rope.periods(64))
    with pytest.raises(ValueError, match="divisible by 4"):
        rope.periods(18)


def test_rope_apply_is_rotate_half_and_keeps_prefix_tokens_bit_exact():
    x = np.float32(np.random.randn(2, 7, 3, 8))
    settings = rope.Rope(head_dim=8)
    sin, cos = settings.tables(2, 3, num_prefix=1)
    out = np.asarray(rope.apply(jnp.asarray(x), sin, cos))
    assert np.array_equal(out[:, :1], x[:, :1])
    ref_sin, ref_cos = _np_rope_tables(2, 3, 8)
    x64 = np.float64(x[:, 1:])
    rotated = np.concatenate([-x64[..., 4:], x64[..., :4]], -1)
    ref = x64 * ref_cos[None, :, None] + rotated * ref_sin[None, :, None]
    np.testing.assert_allclose(out[:, 1:], ref, atol=1e-5)
    # a rotation: norms kept per pair (i, i + D/2), so per vector
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


def test_rope_scores_depend_on_coordinate_differences_only():
    """q_i . k_j after RoPE is a function of pos_i - pos_j: shifting both changes nothing."""
    settings = rope.Rope(head_dim=8)
    q, k = np.float32(np.random.randn(8)), np.float32(np.random.randn(8))
    coords = rope.patch_coords(4, 4)
    sin, cos = rope.sin_cos(coords, settings.periods())
    shifted_sin, shifted_cos = rope.sin_cos(coords + 0.37, settings.periods())

    def score(s, c, i, j):
        rq = rope.apply(jnp.asarray(q)[None, None, None], s[i:i + 1], c[i:i + 1])
        rk = rope.apply(jnp.asarray(k)[None, None, None], s[j:j + 1], c[j:j + 1])
        return float(jnp.sum(rq * rk))

    assert score(sin, cos, 3, 9) == pytest.approx(score(shifted_sin, shifted_cos, 3, 9), abs=1e-5)
    assert score(sin, cos, 3, 9) != pytest.approx(score(sin, cos, 3, 10), abs=1e-3)


def test_rope_augmentation_is_deterministic_per_key_and_off_without_one():
    settings = rope.Rope(head_dim=8, shift=0.5, jitter=1.5, rescale=2.0)
    key = jax.random.key(3)
    a, b = settings.tables(3, 4, 1, key), settings.tables(3, 4, 1, key)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = settings.tables(3, 4, 1, jax.random.key(4))
    assert not np.allclose(a[0], c[0])
    plain = settings.tables(3, 4, 1)
    np.testing.assert_allclose(plain[0][1:], _np_rope_tables(3, 4, 8)[0], atol=TABLE_ATOL)


def test_rope_rescale_draws_one_log_uniform_factor_for_both_axes():
    coords = rope.patch_coords(4, 6)
    factors = []
    for seed in range(200):
        out = np.asarray(rope.augment_coords(coords, jax.random.key(seed), rescale=2.0))
        ratio = out / np.asarray(coords)
        assert np.allclose(ratio, ratio.flat[0], rtol=1e-5)  # one factor, both axes
        factors.append(ratio.flat[0])
    log_factors = np.log(factors)
    assert log_factors.min() >= -math.log(2) - 1e-6 and log_factors.max() <= math.log(2) + 1e-6
    assert log_factors.min() < -0.5 and log_factors.max() > 0.5  # spread over [-log 2, log 2]
    one = rope.augment_coords(coords, jax.random.key(0), rescale=1.0)
    assert np.array_equal(one, coords)  # rescale 1: the identity


# ------------------------------------------------------------------ backbone options

from dinov2_jax.models import vit  # noqa: E402

# Tiny DINOv3-style backbone; LayerScale 1 so that every block changes the output.
TINY = dict(embed_dim=32, depth=2, num_heads=2, layerscale=1.0)


def _tiny(arch="dinov3_vits16", **overrides):
    return vit.build_backbone(arch, **{**TINY, **overrides})


def _init(model, images):
    """Random parameters of every kind (biases, norms and tokens too; init makes them
    constants), drawn with numpy from the shapes: no init to compile."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]

    def draw(path, shape):
        noise = np.float32(0.1 * np.random.randn(*shape.shape))
        return noise + 1 if jax.tree_util.keystr(path).endswith(("'scale']", "'gamma']")) else noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache
def _jitted_apply(model, train):
    return jax.jit(lambda p, x, key: model.apply({"params": p}, x, train=train,
                                                 rngs={"dropout": key}))


def _run(model, params, images, seed=None):
    """model.apply, jitted once per model (eager dispatch compiles every small op);
    train=True with a seed."""
    key = jax.random.key(0 if seed is None else seed)
    return _jitted_apply(model, seed is not None)(params, images, key)


def _images(*shape):
    return jnp.asarray(np.random.randn(*shape, 3), jnp.float32)


def test_rope_backbone_has_no_position_table_and_sees_positions():
    model = _tiny()
    images = _images(2, 32, 48)
    params = _init(model, images)
    assert "pos_embed" not in params and params["register_tokens"].shape == (1, 4, 32)
    out = _run(model, params, images)
    assert out["x_norm_patchtokens"].shape == (2, 6, 32)
    assert out["x_norm_regtokens"].shape == (2, 4, 32)
    # RoPE makes the output depend on where a patch is: flipping the image is not a permutation
    flipped = _run(model, params, images[:, :, ::-1])
    patches = np.asarray(out["x_norm_patchtokens"]).reshape(2, 2, 3, 32)[:, :, ::-1]
    assert not np.allclose(np.asarray(flipped["x_norm_patchtokens"]).reshape(2, 2, 3, 32),
                           patches, atol=1e-3)


def test_rope_rescale_is_deterministic_per_seed_and_identity_at_eval_with_rescale_one():
    model = _tiny(rope_rescale=2.0, rope_shift=0.1)
    images = _images(2, 32, 32)
    params = _init(model, images)
    train = jax.jit(lambda p, key, rescale: model.clone(rope_rescale=rescale).apply(
        {"params": p}, images, train=True, rngs={"dropout": key})["x_norm_clstoken"],
        static_argnums=2)
    first = train(params, jax.random.key(5), 2.0)
    assert np.array_equal(first, train(params, jax.random.key(5), 2.0))
    assert not np.allclose(first, train(params, jax.random.key(6), 2.0), atol=1e-4)
    eval_out = _run(model, params, images)["x_norm_clstoken"]
    assert not np.allclose(first, eval_out, atol=1e-4)  # augmentation on in training
    plain = model.clone(rope_rescale=1.0, rope_shift=None)
    plain_train = jax.jit(lambda p, key: plain.apply({"params": p}, images, train=True,
                                                     rngs={"dropout": key}))
    assert np.array_equal(plain_train(params, jax.random.key(5))["x_norm_clstoken"],
                          _run(plain, params, images)["x_norm_clstoken"])


def test_mask_k_bias_ignores_the_k_third_of_the_bias():
    model = _tiny()
    images = _images(2, 32, 32)
    params = _init(model, images)
    bias = jnp.asarray(params["blocks"]["attn"]["qkv"]["bias"])
    run = lambda b: _run(model, {**params, "blocks": {**params["blocks"], "attn": {
        **params["blocks"]["attn"], "qkv": {**params["blocks"]["attn"]["qkv"], "bias": b}}}},
        images)["x_norm_clstoken"]
    base = run(bias)
    assert np.array_equal(base, run(bias.at[:, 32:64].add(5.0)))  # K third: no effect
    assert not np.allclose(base, run(bias.at[:, :32].add(0.5)), atol=1e-4)  # Q third: used
    unmasked = model.clone(mask_k_bias=False)
    assert not np.allclose(base, _run(unmasked, params, images)["x_norm_clstoken"], atol=1e-5)
    no_bias = _tiny(qkv_bias=False)
    assert "bias" not in jax.eval_shape(no_bias.init, jax.random.key(0), images)["params"][
        "blocks"]["attn"]["qkv"]


def test_unpacked_swiglu_is_packed_swiglu_with_w12_concatenated():
    unpacked = _tiny("dinov3_vits16plus")
    images = _images(2, 32, 32)
    params = _init(unpacked, images)
    mlp = params["blocks"]["mlp"]
    assert mlp["w1"]["kernel"].shape == (2, 32, 128)  # int(int(32 * 6) * 2 / 3) = 128
    packed_mlp = {"w12": {k: jnp.concatenate([mlp["w1"][k], mlp["w2"][k]], axis=-1)
                          for k in ("kernel", "bias")}, "w3": mlp["w3"]}
    packed = unpacked.clone(swiglu_unpacked=False)
    ours = _run(unpacked, params, images)["x_norm_patchtokens"]
    theirs = _run(packed, {**params, "blocks": {**params["blocks"], "mlp": packed_mlp}},
                  images)["x_norm_patchtokens"]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)  # fp32, one matmul split in two


def test_swiglu_hidden_alignment():
    assert vit.swiglu_hidden_dim(4096, 3, align=64) == 8192  # ViT-7B
    assert vit.swiglu_hidden_dim(100, 3, align=64) == 256    # 200 rounded up to 64
    assert vit.swiglu_hidden_dim(100, 3) == 200
    assert vit.swiglu_hidden_dim(1536, 4.0) == 4096  # ViT-g, unchanged


def test_untied_local_cls_norm_normalises_local_crops_cls_and_storage_in_training():
    model = _tiny(untie_local_cls_norm=True)
    global_crops, local_crops = _images(2, 32, 32), _images(4, 16, 16)
    params = _init(model, global_crops)
    assert set(params["local_cls_norm"]) == {"scale", "bias"}
    plain = model.clone(rope_rescale=None)  # the same tokens without coordinate augmentation
    train = _run(plain, params, [global_crops, local_crops], seed=0)
    evals = _run(plain, params, [global_crops, local_crops])
    assert np.array_equal(train[0]["x_norm_clstoken"], evals[0]["x_norm_clstoken"])
    assert np.array_equal(train[1]["x_norm_patchtokens"], evals[1]["x_norm_patchtokens"])
    prenorm = train[1]["x_prenorm"][:, :5]
    mean = prenorm.mean(-1, keepdims=True)
    var = ((prenorm - mean) ** 2).mean(-1, keepdims=True)
    local = params["local_cls_norm"]
    expected = (prenorm - mean) / np.sqrt(var + 1e-5) * local["scale"] + local["bias"]
    np.testing.assert_allclose(train[1]["x_norm_clstoken"], expected[:, 0], atol=1e-5)
    np.testing.assert_allclose(train[1]["x_norm_regtokens"], expected[:, 1:], atol=1e-5)
    assert not np.allclose(train[1]["x_norm_clstoken"], evals[1]["x_norm_clstoken"], atol=1e-3)


def test_packed_crops_with_rope_equal_unpacked():
    model = _tiny(drop_path_rate=0.4, rope_rescale=2.0)
    crops = [_images(4, 32, 32), _images(8, 16, 16)]
    params = _init(model, crops[0])
    run = lambda m: _run(m, params, crops, seed=2)
    unpacked, packed = run(model), run(model.clone(pack_crops=True))
    for a, b in zip(unpacked, packed):
        # fp32, the same math in another association order (packed matmuls)
        np.testing.assert_allclose(a["x_norm_patchtokens"], b["x_norm_patchtokens"], atol=1e-5)
        np.testing.assert_allclose(a["x_norm_clstoken"], b["x_norm_clstoken"], atol=1e-5)
    same_length = [_images(4, 16, 32), _images(4, 32, 16)]
    with pytest.raises(ValueError, match="distinct lengths"):
        _run(model.clone(pack_crops=True), params, same_length)


def test_head_normalisation_has_torchs_zero_gradient_at_zero_rows():
    """A RoPE model has no position embedding: a masked patch token (zeros at init) that drop
    path skips in every block reaches the head as zeros; the L2 norm's gradient must not be
    NaN there (torch's F.normalize gives 0 for the norm's part)."""
    from dinov2_jax.models import heads
    x = np.float32(np.random.randn(3, 8))
    x[1] = 0
    np.testing.assert_allclose(heads.l2_normalize(x), x / np.maximum(
        np.linalg.norm(x, axis=-1, keepdims=True), 1e-12), rtol=1e-6)
    grads = jax.grad(lambda v: jnp.sum(heads.l2_normalize(v) * jnp.arange(8.0)))(jnp.asarray(x))
    assert np.all(np.isfinite(grads))
    np.testing.assert_allclose(grads[1], np.arange(8.0) / 1e-12, rtol=1e-6)


def test_config_keys_build_the_dinov3_backbone_and_are_validated():
    from dinov2_jax import configs
    config = configs.default_config()
    assert vit.backbone_from_config(config).pos_embed == "learned"  # DINOv2 by default
    config.student.update(pos_embed="rope", rope_rescale=2.0, num_register_tokens=4,
                          mask_k_bias=True, layernorm_eps=1e-5, ffn_layer="swiglu",
                          swiglu_unpacked=True, ffn_align=64, untie_local_cls_norm=True)
    configs.validate(config, 1)
    model = vit.backbone_from_config(config)
    assert (model.rope_rescale, model.rope_shift, model.rope_min_period) == (2.0, None, None)
    assert model.swiglu_unpacked and model.ffn_align == 64 and model.untie_local_cls_norm
    for key, value, message in [("student.rope_rescale", 0.5, "needs x >= 1"),
                                ("student.pos_embed", "sincos", "not one of"),
                                ("student.rope_max_period", 10.0, "set both"),
                                ("student.num_heads", 8, "divisible by 4")]:
        bad = configs.default_config()
        bad.student.update(pos_embed="rope", embed_dim=48)  # 6 heads of 8
        bad.update_from_flattened_dict({key: value})
        with pytest.raises(configs.ConfigError, match=message):
            configs.validate(bad, 1)
