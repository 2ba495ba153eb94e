"""Pallas flash attention with segment ids (packed crops), forward and backward.

Owns `flash_attention`: softmax(q k^T / sqrt(head_dim)) v over BTNH arrays where a token
attends only to tokens with the same segment id. It is written for the Pallas GPU (Triton)
lowering and runs anywhere with `interpret=True` (how the CPU tests run it). It is not written
for TPU Mosaic; on TPU use splash attention (`dinov2_jax.models.attention`).

Algorithm (FlashAttention-2): one program per (batch, head, q block) walks the k blocks with an
online softmax in float32 and saves the per-row log-sum-exp. The backward recomputes the
probabilities from it in two kernels, one per k block for dk/dv and one per q block for dq.
Every kernel skips a (q block, k block) pair whose segment-id ranges [min, max] do not
overlap, so crops laid out one after another only pay for the blocks near the diagonal.

Padding: the sequence is padded inside to a multiple of the block size, and the padded tokens
get the reserved segment id `PADDING_SEGMENT_ID` (int32 max), which real tokens never see.
Callers mark their own padding tokens by giving them a segment id of their own that no real
token uses (e.g. -1): real tokens then ignore them, and the padding tokens attend among
themselves (a finite output that the caller discards).
"""
import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

PADDING_SEGMENT_ID = int(jnp.iinfo(jnp.int32).max)
_MASKED_LOGIT = -1e30  # Finite, so fully masked rows never produce inf - inf.
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel settings; hashable, so it can be a non-differentiable custom_vjp argument."""
    block_q: int
    block_k: int
    head_dim: int  # Unpadded head dim: the softmax scale is head_dim**-0.5.
    num_warps: int
    num_stages: int
    interpret: bool

    @property
    def logit_scale(self) -> float:
        """Scale from q.k to base-2 logits: the kernels use exp2, as the GPU has it natively."""
        return self.head_dim**-0.5 * math.log2(math.e)

    def compiler_params(self):
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _dot(a, b, contract_a: int, contract_b: int):
    """2-D matmul in float32 contracting one axis of each operand."""
    dims = (((contract_a,), (contract_b,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _ranges_overlap(seg_a, seg_b):
    """Whether two blocks of segment ids can share a segment (their [min, max] ranges meet)."""
    return (jnp.min(seg_a) <= jnp.max(seg_b)) & (jnp.min(seg_b) <= jnp.max(seg_a))


def _base2_logits(q, k, seg_q, seg_k, config: _Config):
    """(block_q, block_k) float32 logits in base 2, with other segments' pairs masked."""
    logits = _dot(q, k, 1, 1) * config.logit_scale
    return jnp.where(seg_q[:, None] == seg_k[None, :], logits, _MASKED_LOGIT)


def _forward_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_kv_ref, out_ref, lse_ref, *,
                    config: _Config):
    """One (batch, head, q block): online softmax over all overlapping k blocks."""
    block_q, block_k = config.block_q, config.block_k
    q = q_ref[...]
    seg_q = seg_q_ref[...]

    def visit_k_block(j, carry):
        kv_slice = pl.ds(j * block_k, block_k)
        seg_k = seg_kv_ref[kv_slice]

        def accumulate(carry):
            acc, row_max, row_sum = carry
            logits = _base2_logits(q, k_ref[kv_slice, :], seg_q, seg_k, config)
            new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
            correction = jnp.exp2(row_max - new_max)
            probs = jnp.exp2(logits - new_max[:, None])
            row_sum = row_sum * correction + jnp.sum(probs, axis=1)
            v = v_ref[kv_slice, :]
            acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v, 1, 0)
            return acc, new_max, row_sum

        return lax.cond(_ranges_overlap(seg_q, seg_k), accumulate, lambda c: c, carry)

    init = (jnp.zeros((block_q, q.shape[-1]), jnp.float32),
            jnp.full((block_q,), _MASKED_LOGIT, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, row_max, row_sum = lax.fori_loop(0, k_ref.shape[0] // block_k, visit_k_block, init)
    out_ref[...] = (acc / row_sum[:, None]).astype(out_ref.dtype)
    lse_ref[...] = row_max + jnp.log2(row_sum)


def _dq_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_kv_ref, dout_ref, lse_ref, delta_ref,
               dq_ref, *, config: _Config):
    """One (batch, head, q block): dq = scale * sum_k dS k over overlapping k blocks."""
    block_k = config.block_k
    q, dout = q_ref[...], dout_ref[...]
    seg_q, lse, delta = seg_q_ref[...], lse_ref[...], delta_ref[...]

    def visit_k_block(j, dq):
        kv_slice = pl.ds(j * block_k, block_k)
        seg_k = seg_kv_ref[kv_slice]

        def accumulate(dq):
            k = k_ref[kv_slice, :]
            probs = jnp.exp2(_base2_logits(q, k, seg_q, seg_k, config) - lse[:, None])
            dprobs = _dot(dout, v_ref[kv_slice, :], 1, 1)
            dlogits = probs * (dprobs - delta[:, None])
            return dq + _dot(dlogits.astype(k.dtype), k, 1, 0)

        return lax.cond(_ranges_overlap(seg_q, seg_k), accumulate, lambda d: d, dq)

    dq = lax.fori_loop(0, k_ref.shape[0] // block_k, visit_k_block,
                       jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * config.head_dim**-0.5).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_kv_ref, dout_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, config: _Config):
    """One (batch, head, k block): dk and dv summed over overlapping q blocks."""
    block_q = config.block_q
    k, v = k_ref[...], v_ref[...]
    seg_k = seg_kv_ref[...]

    def visit_q_block(i, carry):
        q_slice = pl.ds(i * block_q, block_q)
        seg_q = seg_q_ref[q_slice]

        def accumulate(carry):
            dk, dv = carry
            q, dout = q_ref[q_slice, :], dout_ref[q_slice, :]
            lse, delta = lse_ref[q_slice], delta_ref[q_slice]
            probs = jnp.exp2(_base2_logits(q, k, seg_q, seg_k, config) - lse[:, None])
            dv = dv + _dot(probs.astype(dout.dtype), dout, 0, 0)
            dprobs = _dot(dout, v, 1, 1)
            dlogits = probs * (dprobs - delta[:, None])
            dk = dk + _dot(dlogits.astype(q.dtype), q, 0, 0)
            return dk, dv

        return lax.cond(_ranges_overlap(seg_q, seg_k), accumulate, lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[0] // block_q, visit_q_block, (zeros, zeros))
    dk_ref[...] = (dk * config.head_dim**-0.5).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _block_specs(seq_len: int, head_dim: int):
    """BlockSpec makers over a (batch, head, block) grid for the three kinds of operand.

    Each maker takes the token tile, or None for all tokens of the (batch, head).
    """
    def tokens(block):  # (B, T, N, D) arrays.
        if block is None:
            return pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, i: (b, 0, h, 0))
        return pl.BlockSpec((None, block, None, head_dim), lambda b, h, i: (b, i, h, 0))

    def rows(block):  # (B, N, T) per-row statistics: log-sum-exp, delta.
        if block is None:
            return pl.BlockSpec((None, None, seq_len), lambda b, h, i: (b, h, 0))
        return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))

    def segments(block):  # (B, T) segment ids.
        if block is None:
            return pl.BlockSpec((None, seq_len), lambda b, h, i: (b, 0))
        return pl.BlockSpec((None, block), lambda b, h, i: (b, i))

    return tokens, rows, segments


def _forward(q, k, v, segment_ids, config: _Config):
    """Runs the forward kernel; returns the output and the base-2 log-sum-exp (B, N, T)."""
    batch, seq_len, heads, head_dim = q.shape
    tokens, rows, segments = _block_specs(seq_len, head_dim)
    return pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        grid=(batch, heads, seq_len // config.block_q),
        in_specs=[tokens(config.block_q), tokens(None), tokens(None), segments(config.block_q),
                  segments(None)],
        out_specs=[tokens(config.block_q), rows(config.block_q)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)],
        compiler_params=config.compiler_params(),
        interpret=config.interpret,
        name="flash_attention_forward",
    )(q, k, v, segment_ids, segment_ids)


def _backward(q, k, v, segment_ids, out, lse, dout, config: _Config):
    """Runs the dq and dk/dv kernels."""
    batch, seq_len, heads, head_dim = q.shape
    tokens, rows, segments = _block_specs(seq_len, head_dim)
    delta = jnp.einsum("btnd,btnd->bnt", out.astype(jnp.float32), dout.astype(jnp.float32))
    operands = (q, k, v, segment_ids, segment_ids, dout, lse, delta)
    block_q, block_k = config.block_q, config.block_k

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, config=config),
        grid=(batch, heads, seq_len // block_q),
        in_specs=[tokens(block_q), tokens(None), tokens(None), segments(block_q),
                  segments(None), tokens(block_q), rows(block_q), rows(block_q)],
        out_specs=tokens(block_q),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=config.compiler_params(),
        interpret=config.interpret,
        name="flash_attention_dq",
    )(*operands)

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, config=config),
        grid=(batch, heads, seq_len // block_k),
        in_specs=[tokens(None), tokens(block_k), tokens(block_k), segments(None),
                  segments(block_k), tokens(None), rows(None), rows(None)],
        out_specs=[tokens(block_k), tokens(block_k)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=config.compiler_params(),
        interpret=config.interpret,
        name="flash_attention_dkv",
    )(*operands)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_attention_padded(q, k, v, segment_ids, config: _Config):
    return _forward(q, k, v, segment_ids, config)[0]


def _flash_attention_fwd(q, k, v, segment_ids, config: _Config):
    out, lse = _forward(q, k, v, segment_ids, config)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_attention_bwd(config: _Config, residuals, dout):
    q, k, v, segment_ids, out, lse = residuals
    return (*_backward(q, k, v, segment_ids, out, lse, dout, config), None)


_flash_attention_padded.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def _check_inputs(q, k, v, segment_ids, block_q: int, block_k: int):
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError("flash_attention expects q, k and v of one shape (batch, tokens, heads, "
                         f"head_dim); got q {q.shape}, k {k.shape}, v {v.shape}.")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError("flash_attention expects q, k and v of one dtype among float32, bfloat16 "
                         f"and float16; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if segment_ids is not None and (segment_ids.shape != q.shape[:2] or
                                    not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be integers of shape (batch, tokens) = {q.shape[:2]}; "
                         f"got {segment_ids.dtype} {segment_ids.shape}.")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles); got {block}.")


def flash_attention(q, k, v, segment_ids=None, *, block_q: int = 64, block_k: int = 64,
                    num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Segment-masked softmax attention, softmax scale head_dim**-0.5.

    Args:
      q, k, v: (batch, tokens, heads, head_dim) arrays of one shape and dtype (float32,
        bfloat16 or float16). Matmuls accumulate in float32; the output has q's dtype.
      segment_ids: optional int (batch, tokens): a token attends only to tokens with the same
        id. None means one segment. Ids are arbitrary ints below `PADDING_SEGMENT_ID`; sorting
        them along the tokens (crops one after another) lets the kernels skip most blocks.
      block_q, block_k: token tiles (powers of two >= 16); tokens are padded inside to a
        multiple of both, and the head dim to a power of two >= 16.
      num_warps, num_stages: Triton launch settings (ignored when interpreting).
      interpret: run the kernels in the Pallas interpreter (CPU tests).

    Returns:
      (batch, tokens, heads, head_dim) attention output, differentiable in q, k and v.
    """
    _check_inputs(q, k, v, segment_ids, block_q, block_k)
    _, seq_len, _, head_dim = q.shape
    block = max(block_q, block_k)
    padded_len = pl.cdiv(seq_len, block) * block
    padded_dim = max(16, pl.next_power_of_2(head_dim))
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded_len - seq_len)),
                          constant_values=PADDING_SEGMENT_ID)
    pad = ((0, 0), (0, padded_len - seq_len), (0, 0), (0, padded_dim - head_dim))
    config = _Config(block_q=block_q, block_k=block_k, head_dim=head_dim, num_warps=num_warps,
                     num_stages=num_stages, interpret=interpret)
    out = _flash_attention_padded(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad),
                                  segment_ids, config)
    return out[:, :seq_len, :, :head_dim]
