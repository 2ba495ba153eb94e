"""Every attention backend that runs on CPU against dense masked attention; the benchmark."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax.models.attention import dot_product_attention

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_attention(q, k, v, segment_ids):
    """softmax(q k^T / sqrt(d)) v in float32, masked to pairs of equal segment id."""
    logits = jnp.einsum("btnd,bsnd->bnts", q, k) * q.shape[-1]**-0.5
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    weights = jax.nn.softmax(jnp.where(same, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", weights, v)


def outputs_and_grads(attention, q, k, v, cotangent):
    """Jitted attention output and its q, k, v cotangents."""
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(attention, q, k, v)
        return (out, *vjp(cotangent))
    return jax.jit(run)(q, k, v, cotangent)


def random_segment_lengths(rng, seq_len: int) -> tuple[int, ...]:
    cuts = np.sort(rng.choice(np.arange(1, seq_len), size=rng.integers(1, 10), replace=False))
    return tuple(int(n) for n in np.diff([0, *cuts, seq_len]))


@pytest.mark.parametrize("segments", ["none", "ids", "lengths"])
@pytest.mark.parametrize("backend", ["xla", "pallas", "splash"])
def test_backend_matches_dense_attention(backend, segments):
    rng = np.random.default_rng()
    batch, seq_len, heads, head_dim = 2, int(rng.integers(60, 250)), 2, 32
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal((batch, seq_len, heads, head_dim)),
                                      jnp.float32) for _ in range(4))
    lengths = random_segment_lengths(rng, seq_len) if segments != "none" else (seq_len,)
    dense_ids = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None].repeat(batch, 0))
    kwargs = {"none": {}, "ids": {"segment_ids": dense_ids},
              "lengths": {"segment_lengths": lengths}}[segments]

    got = outputs_and_grads(
        lambda q, k, v: dot_product_attention(q, k, v, backend=backend, interpret=True, **kwargs),
        q, k, v, cotangent)
    want = outputs_and_grads(lambda q, k, v: dense_attention(q, k, v, dense_ids),
                             q, k, v, cotangent)
    for name, x, reference in zip(["out", "dq", "dk", "dv"], got, want):
        error = np.max(np.abs(x - reference)) / np.max(np.abs(reference))
        assert error < 1e-5, (name, lengths)


def test_splash_with_segment_ids_and_lengths_and_padding():
    """Splash given both descriptions of the layout, with a padding segment of id -1."""
    rng = np.random.default_rng()
    lengths = (50, 50, 7)
    ids = jnp.asarray(np.repeat([0, 1, -1], lengths)[None])
    q, k, v = (jnp.asarray(rng.standard_normal((1, 107, 2, 32)), jnp.float32) for _ in range(3))
    got = dot_product_attention(q, k, v, ids, segment_lengths=lengths, backend="splash",
                                interpret=True)
    np.testing.assert_allclose(got, dense_attention(q, k, v, ids), atol=1e-5, rtol=1e-5)


def test_auto_is_xla_on_cpu():
    rng = np.random.default_rng()
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 3, 16)), jnp.float32) for _ in range(3))
    ids = jnp.asarray(rng.integers(0, 3, (2, 37)))
    np.testing.assert_array_equal(dot_product_attention(q, k, v, ids),
                                  dot_product_attention(q, k, v, ids, backend="xla"))


def test_bfloat16_keeps_dtype():
    rng = np.random.default_rng()
    q, k, v = (jnp.asarray(rng.standard_normal((1, 21, 2, 16)), jnp.bfloat16) for _ in range(3))
    ids = jnp.asarray(np.repeat([0, 1], [9, 12])[None])
    want = dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), ids)
    for backend in ("xla", "pallas"):
        got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, ids, backend=backend,
                                                            interpret=True))(q, k, v)
        assert got.dtype == jnp.bfloat16
        assert np.max(np.abs(got.astype(jnp.float32) - want)) / np.max(np.abs(want)) < 2e-2


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="flash"), "Unknown attention backend 'flash'"),
    (dict(backend="cudnn"), "'cudnn' needs a GPU"),
    (dict(backend="splash"), "'splash' needs a TPU"),
    (dict(backend="pallas"), "'pallas' .* needs a GPU"),
    (dict(segment_lengths=(4, 4)), "segment_lengths must be a static tuple"),
    (dict(segment_lengths=[5, 5]), "segment_lengths must be a static tuple"),
    (dict(segment_ids=jnp.zeros((1, 9), jnp.int32)), "segment_ids must have shape"),
])
def test_rejects_bad_arguments(kwargs, message):
    q = jnp.zeros((1, 10, 2, 16))
    with pytest.raises(ValueError, match=message):
        dot_product_attention(q, q, q, **kwargs)


def test_benchmark_quick_prints_table():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "attention.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("device: cpu") for line in lines), result.stdout
    header = next(line for line in lines if line.startswith("| backend"))
    assert "fwd ms" in header and "fwd+bwd ms" in header
    rows = [line for line in lines if line.startswith("| xla")]
    assert any("packed" in row for row in rows) and any("global" in row for row in rows)
    assert any("packed vs separate" in line for line in lines), result.stdout
