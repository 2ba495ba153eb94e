"""The Pallas flash-attention kernel (interpret mode on CPU) against dense masked attention."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax.kernels.flash_attention import flash_attention

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def dense_attention(q, k, v, segment_ids):
    """softmax(q k^T / sqrt(d)) v in float32, masked to pairs of equal segment id."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) * q.shape[-1]**-0.5
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    weights = jax.nn.softmax(jnp.where(same, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", weights, v)


def relative_error(x, reference):
    x, reference = np.asarray(x, np.float32), np.asarray(reference, np.float32)
    return np.max(np.abs(x - reference)) / np.max(np.abs(reference))


def outputs_and_grads(attention, q, k, v, cotangent):
    """Jitted attention output and its q, k, v cotangents (jit: interpreting op by op is slow)."""
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(attention, q, k, v)
        return (out, *vjp(cotangent.astype(out.dtype)))
    return jax.jit(run)(q, k, v, cotangent)


def random_case(rng, kind: str):
    """Random shape, blocks and segment ids; tokens never a multiple of the block."""
    block_q, block_k = rng.choice([16, 32], size=2)
    seq_len = int(rng.integers(1, 301))
    while seq_len % max(block_q, block_k) == 0:
        seq_len = int(rng.integers(1, 301))
    batch, heads = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    head_dim = int(rng.choice([16, 24, 32]))
    if kind == "no_segments":
        segment_ids = None
    elif kind == "one_segment":
        segment_ids = np.full((batch, seq_len), rng.integers(-5, 5))
    elif kind == "segments":  # 1-10 segments of random lengths, one after another.
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=min(rng.integers(0, 10), seq_len - 1),
                                  replace=False))
        segment_ids = np.stack([np.repeat(np.arange(len(cuts) + 1), np.diff([0, *cuts, seq_len]))
                                for _ in range(batch)])
    elif kind == "interleaved":  # Unsorted ids: the block ranges overlap everywhere.
        segment_ids = rng.integers(0, 4, size=(batch, seq_len))
    else:
        raise ValueError(kind)
    shape = (batch, seq_len, heads, head_dim)
    return dict(shape=shape, segment_ids=segment_ids, block_q=int(block_q), block_k=int(block_k))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["no_segments", "one_segment", "segments", "interleaved"])
def test_forward_and_grads_match_dense_attention(kind, dtype):
    rng = np.random.default_rng()
    case = random_case(rng, kind)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(case["shape"]), dtype) for _ in range(4))
    segment_ids = case["segment_ids"]
    dense_ids = jnp.zeros(case["shape"][:2], jnp.int32) if segment_ids is None else segment_ids
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)

    got = outputs_and_grads(
        lambda q, k, v: flash_attention(q, k, v, segment_ids, block_q=case["block_q"],
                                        block_k=case["block_k"], interpret=True),
        q, k, v, cotangent)
    want = outputs_and_grads(lambda q, k, v: dense_attention(q, k, v, jnp.asarray(dense_ids)),
                             q.astype(jnp.float32), k.astype(jnp.float32),
                             v.astype(jnp.float32), cotangent.astype(jnp.float32))
    for name, x, reference in zip(["out", "dq", "dk", "dv"], got, want):
        assert x.dtype == dtype, name
        assert relative_error(x, reference) < TOLERANCE[dtype], (name, case["shape"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_padding_tokens_are_invisible(dtype):
    """Real tokens followed by padding (its own id, -1) equal attention over the real tokens."""
    rng = np.random.default_rng()
    real_len = int(rng.integers(20, 120))
    seq_len = real_len + int(rng.integers(1, 40))
    shape = (2, seq_len, 2, 32)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
    cotangent = cotangent.at[:, real_len:].set(0)  # The loss reads real tokens only.
    segment_ids = jnp.where(jnp.arange(seq_len) < real_len, 0, -1)[None].repeat(2, axis=0)

    got = outputs_and_grads(
        lambda q, k, v: flash_attention(q, k, v, segment_ids, block_q=32, block_k=16,
                                        interpret=True), q, k, v, cotangent)
    real = lambda x: x[:, :real_len].astype(jnp.float32)
    want = outputs_and_grads(
        lambda q, k, v: dense_attention(q, k, v, jnp.zeros((2, real_len), jnp.int32)),
        real(q), real(k), real(v), real(cotangent))
    for name, x, reference in zip(["out", "dq", "dk", "dv"], got, want):
        assert relative_error(x[:, :real_len], reference) < TOLERANCE[dtype], name
    for name, grad in zip(["dq", "dk", "dv"], got[1:]):
        np.testing.assert_array_equal(np.asarray(grad[:, real_len:], np.float32), 0, err_msg=name)


def test_blocks_of_other_segments_are_skipped():
    """NaNs in a block-aligned segment reach no other segment: its blocks are never computed.

    A computed block would multiply the zero probabilities of the other segment with its NaN
    values (0 * NaN = NaN), so finite outputs and gradients show that the blocks were skipped.
    """
    rng = np.random.default_rng()
    lengths = (32, 48, 16)
    segment_ids = jnp.asarray(np.repeat(np.arange(3), lengths)[None])
    poisoned = segment_ids == 1
    shape = (1, sum(lengths), 2, 16)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
    cotangent = jnp.where(poisoned[..., None, None], 0.0, cotangent)
    poison = lambda x: jnp.where(poisoned[..., None, None], jnp.nan, x)

    got = outputs_and_grads(
        lambda q, k, v: flash_attention(q, k, v, segment_ids, block_q=16, block_k=16,
                                        interpret=True),
        poison(q), poison(k), poison(v), cotangent)
    want = outputs_and_grads(lambda q, k, v: dense_attention(q, k, v, segment_ids),
                             q, k, v, cotangent)
    clean = ~np.asarray(poisoned[0])
    for name, x, reference in zip(["out", "dq", "dk", "dv"], got, want):
        assert np.isfinite(np.asarray(x[:, clean])).all(), name
        assert relative_error(x[:, clean], reference[:, clean]) < 1e-5, name


def _gpu_target():
    """Newer JAX (0.11+) lowers Pallas-Triton without a GPU only for an abstract GPU device
    named by the context; 0.10 lowers for any "cuda" target."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def test_lowers_to_triton_for_gpu():
    """Forward and backward go through the Pallas Triton lowering (3 kernels), no GPU needed."""
    spec = jax.ShapeDtypeStruct((2, 914, 6, 64), jnp.bfloat16)
    segment_ids = jax.ShapeDtypeStruct((2, 914), jnp.int32)
    loss = lambda q, k, v, ids: flash_attention(q, k, v, ids).astype(jnp.float32).sum()
    with _gpu_target():
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(
            spec, spec, spec, segment_ids).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_q=48), "block_q must be a power of two"),
    (dict(block_k=8), "block_k must be a power of two"),
    (dict(k_shape=(1, 9, 2, 16)), "one shape"),
    (dict(segment_shape=(1, 9)), "segment_ids must be integers of shape"),
])
def test_rejects_bad_inputs(kwargs, message):
    q = jnp.zeros((1, 10, 2, 16))
    k = jnp.zeros(kwargs.pop("k_shape", q.shape))
    segment_ids = jnp.zeros(kwargs.pop("segment_shape", (1, 10)), jnp.int32)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, k, segment_ids, interpret=True, **kwargs)


def test_rejects_integer_inputs():
    q = jnp.zeros((1, 10, 2, 16), jnp.int32)
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        flash_attention(q, q, q, interpret=True)
