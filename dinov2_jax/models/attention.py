"""Multi-head attention for the ViT: one function, several backends.

Owns `dot_product_attention(q, k, v, segment_ids, *, segment_lengths, backend, interpret)`:
softmax(q k^T / sqrt(head_dim)) v over (batch, tokens, heads, head_dim) arrays, where a token
attends only to tokens of its own segment (packed crops). Backends:

  'xla'     jax.nn.dot_product_attention; segments become a dense block-diagonal mask.
  'cudnn'   GPU, bfloat16/float16: tokens padded to a multiple of 8 (cuDNN rejects 257 and 261)
            with the true lengths passed, or with segments a dense block-diagonal mask.
  'splash'  TPU Pallas splash attention. With a static `segment_lengths` layout the mask is a
            static block-diagonal NumpyMask, so empty 128x128 blocks are skipped.
  'pallas'  the project's own flash-attention kernel (dinov2_jax.kernels.flash_attention),
            GPU Triton lowering, skips blocks from the segment ids.
  'auto'    per platform: cpu -> xla; gpu -> cudnn for bfloat16/float16 (measured 3.8x faster
            than XLA at ViT-g shapes on an H100; `benchmarks/attention.py` times the backends),
            xla for float32; tpu -> splash. The own kernel is not chosen on GPU until it is
            measured faster than cuDNN.

Segments: `segment_ids` (int, (batch, tokens), traced) and/or `segment_lengths` (a static
tuple of ints summing to tokens, one layout for the whole batch). Every backend takes either.
Padding tokens are marked by a segment id (or a segment length) of their own: real tokens
never see them, and they attend among themselves (finite outputs to discard). Ids must be
below `PADDING_SEGMENT_ID` (int32 max), which marks the padding added inside.
"""
import functools

import jax
from jax.experimental.pallas.ops.tpu import splash_attention
import jax.numpy as jnp
import numpy as np

from dinov2_jax.kernels.flash_attention import flash_attention
from dinov2_jax.kernels.flash_attention import PADDING_SEGMENT_ID

BACKENDS = ("auto", "xla", "cudnn", "splash", "pallas")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_LENGTH_MULTIPLE = 8
_SPLASH_BLOCK = 128


def _resolve_backend(backend: str, dtype, interpret: bool) -> str:
    """The concrete backend for this platform and dtype; ValueError for what cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; expected one of {BACKENDS}.")
    platform = jax.default_backend()
    if backend == "auto":
        if platform == "gpu":
            return "cudnn" if dtype in _CUDNN_DTYPES else "xla"
        return "splash" if platform == "tpu" else "xla"
    if backend == "cudnn" and platform != "gpu":
        raise ValueError(f"Attention backend 'cudnn' needs a GPU; the platform is {platform!r}.")
    if backend == "cudnn" and dtype not in _CUDNN_DTYPES:
        raise ValueError("Attention backend 'cudnn' takes bfloat16 or float16 inputs; got "
                         f"{dtype}. Cast the inputs or use backend='xla'.")
    if backend == "splash" and platform != "tpu" and not interpret:
        raise ValueError("Attention backend 'splash' needs a TPU (or interpret=True); the "
                         f"platform is {platform!r}.")
    if backend == "pallas" and platform != "gpu" and not interpret:
        raise ValueError("Attention backend 'pallas' (Triton kernel) needs a GPU (or "
                         f"interpret=True); the platform is {platform!r}.")
    return backend


def _check_inputs(q, k, v, segment_ids, segment_lengths):
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError("dot_product_attention expects q, k and v of one shape (batch, tokens, "
                         f"heads, head_dim); got q {q.shape}, k {k.shape}, v {v.shape}.")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must have shape (batch, tokens) = {q.shape[:2]}; got "
                         f"{segment_ids.shape}.")
    if segment_lengths is not None:
        if (not isinstance(segment_lengths, tuple) or
            not all(isinstance(n, int) and n > 0 for n in segment_lengths) or
            sum(segment_lengths) != q.shape[1]):
            raise ValueError("segment_lengths must be a static tuple of positive ints summing to "
                             f"the {q.shape[1]} tokens; got {segment_lengths!r}.")


def _segment_ids_from_lengths(segment_lengths: tuple[int, ...], batch: int):
    ids = np.repeat(np.arange(len(segment_lengths), dtype=np.int32), segment_lengths)
    return jnp.broadcast_to(jnp.asarray(ids), (batch, ids.size))


def _segment_mask(segment_ids):
    """(batch, 1, tokens, tokens) True where query and key share a segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _pad_tokens(x, multiple: int, value=0):
    """Pads axis 1 (tokens) up to a multiple."""
    padding = -x.shape[1] % multiple
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, padding)
    return jnp.pad(x, widths, constant_values=value)


def _xla_attention(q, k, v, segment_ids):
    mask = None if segment_ids is None else _segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _cudnn_attention(q, k, v, segment_ids):
    """cuDNN on tokens padded to a multiple of 8; padding masked by lengths or by segment."""
    batch, seq_len = q.shape[:2]
    q, k, v = (_pad_tokens(x, _CUDNN_LENGTH_MULTIPLE) for x in (q, k, v))
    if segment_ids is None:
        lengths = jnp.full((batch,), seq_len, jnp.int32)
        out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                           key_value_seq_lengths=lengths, implementation="cudnn")
    else:
        segment_ids = _pad_tokens(segment_ids, _CUDNN_LENGTH_MULTIPLE, PADDING_SEGMENT_ID)
        out = jax.nn.dot_product_attention(q, k, v, mask=_segment_mask(segment_ids),
                                           implementation="cudnn")
    return out[:, :seq_len]


@functools.lru_cache(maxsize=64)
def _splash_kernel(padded_len: int, segment_lengths: tuple[int, ...], heads: int,
                   interpret: bool):
    """Splash kernel for one example whose static mask is block-diagonal over the segments.

    The tokens added by padding up to `padded_len` form one more segment.
    """
    padding = padded_len - sum(segment_lengths)
    lengths = segment_lengths + ((padding,) if padding else ())
    ids = np.repeat(np.arange(len(lengths)), lengths)
    mask = splash_attention.NumpyMask(ids[:, None] == ids[None, :])
    return splash_attention.make_splash_mha(
        splash_attention.MultiHeadMask([mask] * heads),
        block_sizes=splash_attention.BlockSizes.get_default(),
        head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, segment_ids, segment_lengths, interpret: bool):
    """Splash on tokens padded to a multiple of 128, vmapped over the batch.

    The static mask comes from `segment_lengths` (one segment if None); traced `segment_ids`
    are applied on top, inside the computed blocks.
    """
    _, seq_len, heads, head_dim = q.shape
    kernel = _splash_kernel(-seq_len % _SPLASH_BLOCK + seq_len, segment_lengths or (seq_len,),
                            heads, interpret)
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)  # Splash applies no softmax scale.
    q, k, v = (jnp.swapaxes(_pad_tokens(x, _SPLASH_BLOCK), 1, 2) for x in (q, k, v))
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        segment_ids = _pad_tokens(segment_ids.astype(jnp.int32), _SPLASH_BLOCK, PADDING_SEGMENT_ID)
        out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, splash_attention.SegmentIds(ids, ids))
                       )(q, k, v, segment_ids)
    return jnp.swapaxes(out, 1, 2)[:, :seq_len]


def dot_product_attention(q, k, v, segment_ids=None, *, segment_lengths=None,
                          backend: str = "auto", interpret: bool = False):
    """Segment-masked multi-head attention with softmax scale head_dim**-0.5.

    Args:
      q, k, v: (batch, tokens, heads, head_dim) arrays of one shape.
      segment_ids: optional int (batch, tokens); tokens attend only within their segment.
      segment_lengths: optional static tuple of ints summing to tokens, the same segment layout
        for every example (crops packed one after another). 'splash' builds its block-sparse
        mask from it; the other backends turn it into segment ids. If both are given they must
        describe the same layout.
      backend: one of BACKENDS (see the module docstring).
      interpret: run the Pallas backends ('splash', 'pallas') in the interpreter, e.g. on CPU.

    Returns:
      (batch, tokens, heads, head_dim) attention output in q's dtype.
    """
    _check_inputs(q, k, v, segment_ids, segment_lengths)
    backend = _resolve_backend(backend, q.dtype, interpret)
    if backend == "splash":
        return _splash_attention(q, k, v, segment_ids, segment_lengths, interpret)
    if segment_ids is None and segment_lengths is not None:
        segment_ids = _segment_ids_from_lengths(segment_lengths, q.shape[0])
    if backend == "xla":
        return _xla_attention(q, k, v, segment_ids)
    if backend == "cudnn":
        return _cudnn_attention(q, k, v, segment_ids)
    return flash_attention(q, k, v, segment_ids, interpret=interpret)
