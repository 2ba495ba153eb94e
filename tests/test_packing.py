"""Sequence packing in the ViT (`pack_crops`): the layout, drop path, and packed == unpacked.

Tolerance: fp32 on CPU. Packed and unpacked run the same per-token math; only the matmul and
softmax summation orders may differ, so outputs and gradients agree to ~1e-6 relative; the
bound is 1e-5 (of the largest magnitude of each compared array).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax.models import attention, packing, vit


def _tiny(**kwargs):
    return vit.DinoVisionTransformer(**{**dict(embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                               img_size=32, layerscale=1.0), **kwargs})


def _labelled_groups(rows, lengths, channels=0):
    """Groups of (rows, length, 1 + channels): 1 + the row's index over all groups, then noise."""
    groups, first = [], 1
    for n, t in zip(rows, lengths):
        labels = np.broadcast_to(np.arange(first, first + n)[:, None, None], (n, t, 1))
        groups.append(jnp.asarray(np.concatenate(
            [labels, np.random.randn(n, t, channels)], axis=-1), jnp.float32))
        first += n
    return groups


def test_student_layout_packs_crops_of_one_image():
    # vitl14 per device, B = 32: 2 global crops of 257 tokens, 8 local crops of 50, image-major.
    rows, lengths = (64, 256), (257, 50)
    layout = packing.plan_packing(rows, lengths)
    assert (layout.sequences, layout.slots, layout.padding_tokens) == (64, (1, 4), 0)
    assert layout.segment_lengths == (257, 50, 50, 50, 50)
    packed = np.asarray(layout.pack(_labelled_groups(rows, lengths)))[..., 0]
    row_ids = packed[:, np.cumsum((0,) + layout.segment_lengths[:-1])].astype(int) - 1
    images = np.where(row_ids < 64, row_ids // 2, (row_ids - 64) // 8)
    assert np.all(images == images[:, :1])  # the crops of a sequence are of one image


def test_drop_path_layout_is_short_with_little_padding():
    # The kept rows of vitl14 (B = 32, rate 0.4): 38 global, 153 local; gcd 1.
    full = packing.plan_packing((64, 256), (257, 50))
    kept = packing.plan_packing((38, 153), (257, 50), full.sequence_length)
    tokens = 38 * 257 + 153 * 50
    assert kept.sequence_length <= full.sequence_length
    assert kept.padding_tokens < 0.03 * tokens
    # A bound is needed: without one the only padding-free layout is one 17,416-token sequence.
    assert packing.plan_packing((38, 153), (257, 50)).sequence_length == tokens


def test_pack_unpack_round_trip_and_segments():
    rng = np.random.default_rng()
    for _ in range(5):
        num_groups = int(rng.integers(1, 4))
        rows = tuple(int(n) for n in rng.integers(1, 12, num_groups))
        lengths = tuple(int(n) for n in rng.integers(1, 9, num_groups))
        layout = packing.PackLayout(rows, lengths, int(rng.integers(1, max(rows) + 2)))
        groups = _labelled_groups(rows, lengths, channels=2)
        packed = layout.pack(groups)
        assert packed.shape == (layout.sequences, layout.sequence_length, 3)
        for x, y in zip(groups, layout.unpack(packed), strict=True):
            np.testing.assert_array_equal(y, x)
        # Each segment is one whole row (or a padding row of zeros), the same layout everywhere.
        labels = np.asarray(packed[..., 0])
        for segment in np.split(labels, np.cumsum(layout.segment_lengths)[:-1], axis=1):
            assert np.all(segment == segment[:, :1])
        assert set(np.unique(labels)) - {0} == set(range(1, sum(rows) + 1))
        assert np.sum(labels == 0) == layout.padding_tokens


def test_packed_drop_path_keeps_a_subset_per_group_in_one_call():
    rate, rows, lengths = 0.4, (10, 25), (5, 2)
    groups = [jnp.asarray(np.random.randn(n, t, 4), jnp.float32) for n, t in zip(rows, lengths)]
    calls = []

    def branch(packed, segment_lengths):
        calls.append(segment_lengths)
        return jnp.ones_like(packed)

    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 2)
    out = packing.packed_drop_path_add(groups, branch, rate, keys, max_length=12)
    keep = [max(int(n * (1 - rate)), 1) for n in rows]
    assert len(calls) == 1 and sum(calls[0]) <= 12
    for x, y, n, s in zip(groups, out, rows, keep):
        added = np.asarray(y - x)
        kept = np.isclose(added[:, 0, 0], n / s)
        assert kept.sum() == s and np.allclose(added[~kept], 0)
        assert np.allclose(added[kept], n / s)


def _random_student_batch():
    global_crops = jnp.asarray(np.random.randn(4, 32, 32, 3), jnp.float32)
    local_crops = jnp.asarray(np.random.randn(8, 16, 16, 3), jnp.float32)
    masks = jnp.asarray(np.random.rand(4, 16) < 0.5)
    return global_crops, local_crops, masks


def _outputs_and_grads(model, params, global_crops, local_crops, masks, train, key):
    """Student outputs and the gradient of a loss on cls and patch tokens of both groups."""
    def loss(params):
        outs = model.apply({"params": params}, [global_crops, local_crops], [masks, None],
                           train=train, rngs={"dropout": key})
        value = sum(jnp.sum(o["x_norm_clstoken"] ** 2) + jnp.sum(jnp.sin(o["x_norm_patchtokens"]))
                    for o in outs)
        return value, outs
    return jax.grad(loss, has_aux=True)(params)[::-1]


def _assert_close(got, want, name):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, name
    if not want.size:
        return
    error = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert error < 1e-5, (name, error)


def _random_params(model, images):
    """Fresh random parameters of the init's shapes (mask token and LayerScale included)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    return jax.tree.map(lambda x: jnp.asarray(0.3 * np.random.randn(*x.shape), x.dtype), shapes)


@pytest.mark.parametrize("drop_path_rate,ffn_layer,num_registers,remat_policy", [
    (0.0, "mlp", 0, "none"),
    (0.4, "swiglu", 2, "dots"),
])
def test_packed_equals_unpacked(drop_path_rate, ffn_layer, num_registers, remat_policy):
    """Train-mode outputs and gradients; with drop path, the same rng keeps the same rows.

    Without drop path (as in eval) also a single group, as the teacher runs its global crops.
    """
    kwargs = dict(drop_path_rate=drop_path_rate, ffn_layer=ffn_layer,
                  num_register_tokens=num_registers)
    unpacked = _tiny(**kwargs)
    packed = _tiny(**kwargs, pack_crops=True, remat_policy=remat_policy)
    global_crops, local_crops, masks = _random_student_batch()
    params = _random_params(unpacked, global_crops)
    key = jax.random.key(np.random.randint(1 << 30))

    @jax.jit
    def both(params):
        return [(*_outputs_and_grads(model, params, global_crops, local_crops, masks, True, key),
                 None if drop_path_rate else model.apply({"params": params}, global_crops))
                for model in (unpacked, packed)]

    (outs_u, grads_u, single_u), (outs_p, grads_p, single_p) = both(params)
    if single_u is not None:
        outs_u, outs_p = outs_u + [single_u], outs_p + [single_p]
    for group, (out_u, out_p) in enumerate(zip(outs_u, outs_p)):
        for name in ("x_norm_clstoken", "x_norm_patchtokens", "x_norm_regtokens", "x_prenorm"):
            _assert_close(out_p[name], out_u[name], (group, name))
    for (path, g_u), g_p in zip(jax.tree_util.tree_leaves_with_path(grads_u),
                                jax.tree.leaves(grads_p)):
        _assert_close(g_p, g_u, jax.tree_util.keystr(path))
    assert np.any(np.asarray(grads_u["mask_token"]) != 0)  # the masks took part
    if num_registers:
        assert np.any(np.asarray(grads_u["register_tokens"]) != 0)


def test_one_attention_call_with_static_segment_lengths(monkeypatch):
    """Packed, a block makes one attention call (unpacked: one per group), its layout static."""
    calls, dot_product_attention = [], attention.dot_product_attention

    def recording_attention(q, k, v, segment_ids=None, **kwargs):
        calls.append((q.shape, segment_ids, kwargs["segment_lengths"]))
        return dot_product_attention(q, k, v, segment_ids, **kwargs)

    monkeypatch.setattr(vit.attention, "dot_product_attention", recording_attention)
    global_crops, local_crops, masks = _random_student_batch()
    counts = []
    for pack_crops in (False, True):
        model = _tiny(pack_crops=pack_crops, num_register_tokens=1, drop_path_rate=0.4)
        params = jax.eval_shape(model.init, jax.random.key(0), global_crops)
        calls.clear()
        for train in (False, True):
            jax.eval_shape(lambda p: model.apply(p, [global_crops, local_crops], [masks, None],
                                                 train=train, rngs={"dropout": jax.random.key(0)}),
                           params)
        counts.append(len(calls))
    assert counts[0] == 2 * counts[1] > 0
    # Eval packs the 4 global and 8 local crops into 4 sequences, train the 2 and 4 kept rows
    # (S = int(0.6 b)) into 2.
    assert {shape[:2] for shape, _, _ in calls} == {(4, 18 + 6 + 6), (2, 18 + 6 + 6)}
    for shape, segment_ids, segment_lengths in calls:
        assert segment_ids is None and isinstance(segment_lengths, tuple)
        assert sum(segment_lengths) == shape[1] and set(segment_lengths) == {18, 6}
