"""The DINOv2 Vision Transformer in Flax Linen (`dinov2/models/vision_transformer.py`).

Patch embedding, cls/register/mask tokens, position-embedding interpolation exactly as the
reference (`pos_embed`), pre-norm blocks (attention, Mlp or SwiGLU, LayerScale;
`dinov2/layers/block.py`) scanned with `nn.scan` and rematerialised with `nn.remat`, drop path
with the batch-subset trick at static shapes (`packing`), and outputs as a dict of named
intermediates. A list of image batches (the student's global and local crops) runs as token
groups through the same scanned blocks: one group after another, or, with `pack_crops`, packed
into equal sequences of block-diagonal attention (`packing.PackLayout`), so that every block
runs one attention call and one set of matmuls over the tokens of all groups. The formulas and
quirks are in docs/reference.md, Model.

DINOv3's options (`dinov3/models/vision_transformer.py`), each off by default: `pos_embed="rope"`
(axial RoPE on patch tokens, `rope`, instead of the learned table), storage tokens (the
register layout), `mask_k_bias`, `qkv_bias`, `layernorm_eps`, `untie_local_cls_norm`, and the
unpacked SwiGLU `w1`/`w2`/`w3` (`swiglu_unpacked`, hidden width aligned to `ffn_align`).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dinov2_jax.models import attention, packing, pos_embed, rope

# Sizes of the reference constructors (`vit_small`... in dinov2/models/vision_transformer.py).
ARCHS = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
    # dinov3/models/vision_transformer.py
    "vit_huge2": dict(embed_dim=1280, depth=32, num_heads=20),
    "vit_7b": dict(embed_dim=4096, depth=40, num_heads=32),
}

# The eight torch.hub backbones (dinov2/hub/backbones.py): construction size 518, LayerScale 1.0.
_HUB_BASE = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large",
             "vitg14": "vit_giant2"}
HUB_MODELS = {}
for _name, _arch in _HUB_BASE.items():
    _common = dict(arch=_arch, patch_size=14, img_size=518, layerscale=1.0,
                   ffn_layer="swiglu" if _arch == "vit_giant2" else "mlp")
    HUB_MODELS[_name] = dict(_common, num_register_tokens=0, interpolate_offset=0.1,
                             interpolate_antialias=False)
    HUB_MODELS[_name + "_reg"] = dict(_common, num_register_tokens=4, interpolate_offset=0.0,
                                      interpolate_antialias=True)

# The DINOv3 hub backbones (dinov3/hub/backbones.py): patch 16, 4 storage tokens, RoPE base 100
# with rescale 2 (a training-time option), LayerNorm eps 1e-5, LayerScale, masked K bias.
_DINOV3_COMMON = dict(patch_size=16, img_size=224, layerscale=1e-5, num_register_tokens=4,
                      pos_embed="rope", rope_rescale=2.0, layernorm_eps=1e-5, mask_k_bias=True)
_DINOV3_SWIGLU = dict(ffn_layer="swiglu", swiglu_unpacked=True, mlp_ratio=6.0)
DINOV3_HUB_MODELS = {
    "dinov3_vits16": dict(_DINOV3_COMMON, arch="vit_small"),
    "dinov3_vits16plus": dict(_DINOV3_COMMON, arch="vit_small", **_DINOV3_SWIGLU),
    "dinov3_vitb16": dict(_DINOV3_COMMON, arch="vit_base"),
    "dinov3_vitl16": dict(_DINOV3_COMMON, arch="vit_large"),
    "dinov3_vitl16plus": dict(_DINOV3_COMMON, arch="vit_large", **_DINOV3_SWIGLU),
    "dinov3_vith16plus": dict(_DINOV3_COMMON, arch="vit_huge2", **_DINOV3_SWIGLU),
    "dinov3_vit7b16": dict(_DINOV3_COMMON, arch="vit_7b", ffn_layer="swiglu",
                           swiglu_unpacked=True, mlp_ratio=3.0, ffn_align=64, qkv_bias=False,
                           untie_local_cls_norm=True),
}
HUB_MODELS.update(DINOV3_HUB_MODELS)
POS_EMBEDS = ("learned", "rope")

# How each export target resizes a learned position table for inputs other than its own grid,
# as (interpolate_offset, interpolate_antialias) by whether the model has registers:
# the official hub constructors (their HUB_MODELS entries), timm's `resample_abs_pos_embed`
# (by size, antialiased) and Hugging Face's `interpolate_pos_encoding` (by size; antialiased
# only in Dinov2WithRegistersModel). RoPE models have no table: every target agrees.
EXPORT_INTERPOLATIONS = {
    "hub": {registers: (HUB_MODELS[name]["interpolate_offset"],
                        HUB_MODELS[name]["interpolate_antialias"])
            for registers, name in ((False, "vits14"), (True, "vits14_reg"))},
    "timm": {False: (0.0, True), True: (0.0, True)},
    "hf": {False: (0.0, False), True: (0.0, True)},
}

FFN_LAYERS = ("mlp", "swiglu")
DTYPES = ("float32", "bfloat16")  # compute dtypes by name (`jnp.dtype(name)`)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Initialisers of the reference (`init_weights_vit_timm`, `DinoVisionTransformer.init_weights`;
# docs/reference.md, Model). torch's trunc_normal_ cuts at +-2 absolute,
# i.e. +-100 sigma for std 0.02, so a plain normal has the same distribution.
dense_init = nn.initializers.normal(0.02)


def torch_default_uniform(fan_in):
    """PyTorch's default Linear/Conv init: U(+-1/sqrt(fan_in)), for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def swiglu_hidden_dim(embed_dim, mlp_ratio, align=8):
    """Hidden width of the reference SwiGLU: 2/3 of the mlp width, rounded up to `align`
    (8 in DINOv2; DINOv3's `swiglu64` aligns to 64)."""
    hidden = int(int(embed_dim * mlp_ratio) * 2 / 3)
    return hidden + (-hidden % align)


def ffn_hidden_dim(embed_dim, mlp_ratio, ffn_layer, align=8):
    """Hidden width of a block's FFN: int(D * mlp_ratio) for mlp, `swiglu_hidden_dim` for swiglu."""
    if ffn_layer not in FFN_LAYERS:
        raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {ffn_layer!r}")
    if ffn_layer == "swiglu":
        return swiglu_hidden_dim(embed_dim, mlp_ratio, align)
    return int(embed_dim * mlp_ratio)


# --------------------------------------------------------------------------------------------
# Blocks.


class LayerScale(nn.Module):
    """Per-channel scale `gamma`, initialised to `init_values`."""
    init_values: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class MaskedKBiasDense(nn.Module):
    """The qkv projection with DINOv3's `mask_k_bias` (`LinearKMaskedBias`): the K third of the
    bias is multiplied by 0, so K has no bias; the stored bias keeps all three thirds."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", dense_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        third = self.features // 3
        bias_mask = np.ones(self.features, np.float32)
        bias_mask[third:2 * third] = 0
        return jnp.dot(x, kernel.astype(self.dtype)) + (bias * bias_mask).astype(self.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (q|k|v, heads contiguous).

    `segment_lengths` (static, summing to the tokens) makes attention block-diagonal over
    packed crops, the same layout in every sequence. `rope_tables` (sin, cos), each
    (T, D_h), rotate queries and keys (`rope.apply`).
    """
    num_heads: int
    backend: str = "auto"
    dtype: Any = jnp.float32
    qkv_bias: bool = True
    mask_k_bias: bool = False

    @nn.compact
    def __call__(self, x, segment_lengths=None, rope_tables=None):
        batch, length, dim = x.shape
        if self.mask_k_bias and self.qkv_bias:
            qkv = MaskedKBiasDense(3 * dim, self.dtype, name="qkv")(x)
        else:
            qkv = nn.Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype,
                           kernel_init=dense_init, name="qkv")(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if rope_tables is not None:
            q, k = rope.apply(q, *rope_tables), rope.apply(k, *rope_tables)
        out = attention.dot_product_attention(q, k, v, segment_lengths=segment_lengths,
                                              backend=self.backend)
        out = out.reshape(batch, length, dim)
        return nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name="proj")(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
        h = jax.nn.gelu(h, approximate=False)
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=dense_init, name="fc2")(h)


class SwiGLU(nn.Module):
    """w12 (gate | value) -> silu(gate) * value -> w3."""
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.hidden_dim, dtype=self.dtype, kernel_init=dense_init, name="w12")(x)
        gate, value = jnp.split(h, 2, axis=-1)
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=dense_init, name="w3")(
            jax.nn.silu(gate) * value)


class SwiGLUUnpacked(nn.Module):
    """DINOv3's `SwiGLUFFN` (`dinov3/layers/ffn_layers.py`): silu(w1 x) * w2 x -> w3. The same
    function as `SwiGLU` with w12 = [w1 | w2], in separate matrices (each shards on its own)."""
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=dense_init, name=name)
        gate, value = dense(self.hidden_dim, "w1")(x), dense(self.hidden_dim, "w2")(x)
        return dense(x.shape[-1], "w3")(jax.nn.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm transformer block applied to a tuple of token groups; a `nn.scan` body.

    Each group (e.g. global and local crops) has its own batch and length; they share the
    weights, and drop path draws an independent subset per group and per branch. Unpacked, the
    groups run one after another; with `pack_crops`, each branch runs once on the (kept) rows of
    all groups packed by `packing.plan_packing` (with drop path: sequences no longer than those
    of the full groups). Both consume the dropout rng alike, so they give equal results. Returns the
    new groups as the scan carry and, when `collect`, also as the scan output.

    With `rope`, group g is a `grids[g]` patch grid after `num_prefix` prefix tokens; every
    block computes its own RoPE tables, in training with fresh coordinate augmentation draws
    per block and group (the dropout stream), as `forward_features_list` of
    `dinov3/models/vision_transformer.py` calls `rope_embed` in every block.
    """
    num_heads: int
    ffn_layer: str
    ffn_hidden_dim: int
    layerscale: float | None
    drop_path_rate: float
    attention_backend: str = "auto"
    pack_crops: bool = False
    dtype: Any = jnp.float32
    train: bool = False
    collect: bool = False
    layernorm_eps: float = 1e-6
    qkv_bias: bool = True
    mask_k_bias: bool = False
    swiglu_unpacked: bool = False
    rope_settings: rope.Rope | None = None
    grids: tuple = ()
    num_prefix: int = 0

    def _rope_tables(self, groups):
        """Per group (sin, cos) over its tokens, or None without RoPE."""
        if self.rope_settings is None:
            return [None] * len(groups)
        augment = self.train and self.rope_settings.augments
        return [self.rope_settings.tables(*grid, self.num_prefix,
                                 self.make_rng("dropout") if augment else None)
                for grid in self.grids]

    @staticmethod
    def _packed_rope_tables(tables, groups, segment_lengths):
        """The tables of a packed sequence: each segment takes its group's (by token count)."""
        if tables[0] is None:
            return None
        by_length = {}
        for x, table in zip(groups, tables):
            by_length.setdefault(x.shape[1], []).append(table)
        if any(len(v) > 1 for v in by_length.values()):
            raise ValueError("pack_crops with RoPE needs token groups of distinct lengths, got "
                             f"{[x.shape[1] for x in groups]}")
        return tuple(jnp.concatenate([by_length[n][0][i] for n in segment_lengths])
                     for i in range(2))

    @nn.compact
    def __call__(self, groups, _):
        norm1 = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="norm1")
        norm2 = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="norm2")
        attn = Attention(self.num_heads, self.attention_backend, self.dtype, self.qkv_bias,
                         self.mask_k_bias, name="attn")
        ffn_cls = (SwiGLUUnpacked if self.swiglu_unpacked
                   else {"mlp": Mlp, "swiglu": SwiGLU}[self.ffn_layer])
        ffn = ffn_cls(self.ffn_hidden_dim, self.dtype, name="mlp")
        if self.layerscale:
            ls1 = LayerScale(self.layerscale, name="ls1")
            ls2 = LayerScale(self.layerscale, name="ls2")
        else:
            ls1 = ls2 = lambda y: y
        use_drop = self.train and self.drop_path_rate > 0
        # Per group: one key for the attention branch, one for the ffn branch.
        rngs = [jax.random.split(self.make_rng("dropout"), 2) if use_drop else (None, None)
                for _ in groups]
        tables = self._rope_tables(groups)
        if self.pack_crops:
            outputs = self._packed(
                groups, rngs if use_drop else None,
                lambda y, lengths: ls1(attn(norm1(y), lengths, self._packed_rope_tables(
                    tables, groups, lengths))),
                lambda y, _: ls2(ffn(norm2(y))))
        else:
            outputs = []
            for x, (attn_rng, ffn_rng), table in zip(groups, rngs, tables):
                x = packing.drop_path_add(
                    x, lambda y, t=table: ls1(attn(norm1(y), rope_tables=t)), self.drop_path_rate,
                    attn_rng)
                x = packing.drop_path_add(x, lambda y: ls2(ffn(norm2(y))), self.drop_path_rate,
                                          ffn_rng)
                outputs.append(x)
        outputs = tuple(outputs)
        return outputs, (outputs if self.collect else None)

    def _packed(self, groups, rngs, attn_branch, ffn_branch):
        """Both residual branches, each one call over the packed (kept) rows of all groups."""
        layout = packing.plan_packing([x.shape[0] for x in groups], [x.shape[1] for x in groups])
        if rngs is None:
            x = layout.pack(groups)
            x = x + attn_branch(x, layout.segment_lengths)
            return layout.unpack(x + ffn_branch(x, layout.segment_lengths))
        groups = packing.packed_drop_path_add(groups, attn_branch, self.drop_path_rate,
                                              [r[0] for r in rngs], layout.sequence_length)
        return packing.packed_drop_path_add(groups, ffn_branch, self.drop_path_rate,
                                            [r[1] for r in rngs], layout.sequence_length)


# --------------------------------------------------------------------------------------------
# The backbone.


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT. Call with an image batch (B, H, W, 3) or a list of batches.

    Returns a dict (or a list of dicts for a list input) with `x_norm_clstoken`,
    `x_norm_regtokens`, `x_norm_patchtokens`, `x_prenorm` and `masks`; with
    `collect_layers=True` also `layers`, the output of every block (depth, B, T, D).

    `pack_crops`: in every block the rows of all groups are packed into equal sequences with a
    static block-diagonal layout, and the block runs one attention call and one set of matmuls
    on them (see `packing.PackLayout`, `packing.plan_packing`). Without drop path there are
    gcd(group batches) sequences of consecutive rows: for the student's [2B global, n_local*B
    local] crops, one global and n_local/2 local crops each (of one image if the rows are
    image-major); with drop path the kept rows of the groups are packed. Same outputs as unpacked; which is faster
    depends on the attention backend and the platform.
    """
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 14
    img_size: int = 224
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"
    layerscale: float | None = 1e-5
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    drop_path_rate: float = 0.0
    remat_policy: str = "none"
    attention_backend: str = "auto"
    pack_crops: bool = False
    dtype: Any = jnp.float32
    # DINOv3 options (dinov3/models/vision_transformer.py); the defaults are DINOv2's.
    pos_embed: str = "learned"
    rope_base: float | None = 100.0
    rope_min_period: float | None = None
    rope_max_period: float | None = None
    rope_normalize: str = "separate"
    rope_shift: float | None = None
    rope_jitter: float | None = None
    rope_rescale: float | None = None
    rope_periods_dtype: str = "float32"
    qkv_bias: bool = True
    mask_k_bias: bool = False
    layernorm_eps: float = 1e-6
    swiglu_unpacked: bool = False
    ffn_align: int = 8
    untie_local_cls_norm: bool = False

    def _validate(self):
        if self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {self.ffn_layer!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.swiglu_unpacked and self.ffn_layer != "swiglu":
            raise ValueError("swiglu_unpacked needs ffn_layer='swiglu'")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                             f"got {self.remat_policy!r}")

    def rope_settings(self):
        """The `rope.Rope` of this model, or None with a learned position embedding."""
        if self.pos_embed != "rope":
            return None
        return rope.Rope(self.embed_dim // self.num_heads, self.rope_base, self.rope_min_period,
                         self.rope_max_period, self.rope_normalize, self.rope_shift,
                         self.rope_jitter, self.rope_rescale, self.rope_periods_dtype)

    def _block_kwargs(self):
        hidden = ffn_hidden_dim(self.embed_dim, self.mlp_ratio, self.ffn_layer, self.ffn_align)
        kwargs = dict(num_heads=self.num_heads, ffn_layer=self.ffn_layer, ffn_hidden_dim=hidden,
                      layerscale=self.layerscale, drop_path_rate=self.drop_path_rate,
                      attention_backend=self.attention_backend, pack_crops=self.pack_crops,
                      dtype=self.dtype)
        dinov3 = dict(layernorm_eps=self.layernorm_eps, qkv_bias=self.qkv_bias,
                      mask_k_bias=self.mask_k_bias, swiglu_unpacked=self.swiglu_unpacked,
                      rope_settings=self.rope_settings(), num_prefix=1 + self.num_register_tokens)
        return {**kwargs, **dinov3}

    def _embedding_params(self):
        dim, patch = self.embed_dim, self.patch_size
        grid = self.img_size // patch
        patch_embed = nn.Conv(
            dim, (patch, patch), strides=(patch, patch), padding="VALID", dtype=self.dtype,
            kernel_init=torch_default_uniform(3 * patch * patch),
            bias_init=torch_default_uniform(3 * patch * patch), name="patch_embed")
        tokens = dict(
            cls=self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim)),
            pos=(self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + grid * grid, dim))
                 if self.pos_embed == "learned" else None),
            mask=self.param("mask_token", nn.initializers.zeros, (1, dim)),
            registers=(self.param("register_tokens", nn.initializers.normal(1e-6),
                                  (1, self.num_register_tokens, dim))
                       if self.num_register_tokens else None))
        return patch_embed, tokens

    def _prepare_tokens(self, patch_embed, tokens, images, masks):
        """Patch embed, mask tokens, cls, position embedding, registers: (B, 1+R+N, D)."""
        batch, height, width, _ = images.shape
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size "
                             f"{patch}")
        x = patch_embed(images.astype(self.dtype)).reshape(batch, -1, self.embed_dim)
        if masks is not None:
            x = jnp.where(masks[..., None], tokens["mask"].astype(x.dtype)[None], x)
        cls = jnp.broadcast_to(tokens["cls"].astype(x.dtype), (batch, 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1)
        if tokens["pos"] is not None:
            pos = pos_embed.interpolate_pos_embed(tokens["pos"], height // patch, width // patch,
                                                  offset=self.interpolate_offset,
                                                  antialias=self.interpolate_antialias,
                                                  square_input=height == width)
            x = x + pos.astype(x.dtype)
        if tokens["registers"] is not None:
            registers = jnp.broadcast_to(tokens["registers"].astype(x.dtype),
                                         (batch, self.num_register_tokens, self.embed_dim))
            x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
        return x

    def _blocks(self, groups, train, collect, grids):
        body = Block
        if self.remat_policy != "none":
            body = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        stack = nn.scan(
            body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(**self._block_kwargs(), train=train, collect=collect, grids=grids,
                     name="blocks")(groups, None)

    def _outputs(self, norm, x_prenorm, masks, layers, cls_norm=None):
        r = self.num_register_tokens
        x_norm = norm(x_prenorm)
        if cls_norm is not None:  # DINOv3's local_cls_norm: its own norm for cls and storage
            x_norm = jnp.concatenate([cls_norm(x_prenorm[:, :1 + r]), x_norm[:, 1 + r:]], axis=1)
        out = {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:1 + r],
            "x_norm_patchtokens": x_norm[:, 1 + r:],
            "x_prenorm": x_prenorm,
            "masks": masks,
        }
        if layers is not None:
            out["layers"] = layers
        return out

    @nn.compact
    def __call__(self, images, masks=None, *, train=False, collect_layers=False):
        self._validate()
        is_list = isinstance(images, (list, tuple))
        image_groups = list(images) if is_list else [images]
        mask_groups = list(masks) if is_list and masks is not None else [masks]
        if len(mask_groups) != len(image_groups):
            mask_groups = mask_groups + [None] * (len(image_groups) - len(mask_groups))
        patch_embed, tokens = self._embedding_params()
        groups = tuple(self._prepare_tokens(patch_embed, tokens, x, m)
                       for x, m in zip(image_groups, mask_groups))
        grids = tuple((x.shape[1] // self.patch_size, x.shape[2] // self.patch_size)
                      for x in image_groups)
        groups, layers = self._blocks(groups, train, collect_layers, grids)
        norm = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="norm")
        cls_norms = [None] * len(groups)
        if self.untie_local_cls_norm:
            # `untie_global_and_local_cls_norm`: in training the second group (local crops)
            # normalises its cls and storage tokens with `local_cls_norm`.
            local_cls_norm = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype,
                                          name="local_cls_norm")
            if self.is_initializing():
                local_cls_norm(jnp.zeros((1, self.embed_dim), self.dtype))
            if train and len(groups) > 1:
                cls_norms[1] = local_cls_norm
        outputs = [self._outputs(norm, x, m, None if layers is None else layers[i], cls_norms[i])
                   for i, (x, m) in enumerate(zip(groups, mask_groups))]
        return outputs if is_list else outputs[0]


def build_backbone(arch, **overrides):
    """A DinoVisionTransformer of a named size (`vit_small`...) or hub model (`vits14_reg`...)."""
    if arch in HUB_MODELS:
        kwargs = dict(HUB_MODELS[arch])
        arch = kwargs.pop("arch")
    elif arch in ARCHS:
        kwargs = {}
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of "
                         f"{sorted(ARCHS) + sorted(HUB_MODELS)}")
    return DinoVisionTransformer(**{**ARCHS[arch], **kwargs, **overrides})


def with_export_interpolation(model, target):
    """`model` resizing its position table as export target `target` ('hub', 'timm' or 'hf')
    does, so that it reproduces the exported model's features at any input size."""
    if target not in EXPORT_INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {target!r}; expected one of "
                         f"{sorted(EXPORT_INTERPOLATIONS)}")
    offset, antialias = EXPORT_INTERPOLATIONS[target][model.num_register_tokens > 0]
    return model.clone(interpolate_offset=offset, interpolate_antialias=antialias)


def export_agreement(model, target):
    """Where the features of `model` exported to `target` agree with `model`'s: a sentence."""
    patch = model.patch_size
    matched = with_export_interpolation(model, target)
    if model.pos_embed == "rope" or (
            (model.interpolate_offset, model.interpolate_antialias)
            == (matched.interpolate_offset, matched.interpolate_antialias)):
        return f"features agree at every input size that is a multiple of {patch}"
    side = model.img_size // patch * patch
    return (f"features agree at {side}x{side} only (the position table's own grid); at other "
            f"sizes {target} resizes the table its own way: load it with --interpolation "
            f"{target} to reproduce its features")


def backbone_from_config(config):
    """The student backbone of a run config: `config.student` at `crops.global_crops_size`.

    student.embed_dim / depth / num_heads, when non-zero, override the arch's sizes; the
    teacher is the same module (its drop path is off outside training). RoPE settings of 0.0
    are unset.
    """
    student = config.student
    sizes = {k: student[k] for k in ("embed_dim", "depth", "num_heads") if student[k]}
    dinov3 = {k: student[k] for k in ("pos_embed", "rope_base", "rope_normalize", "qkv_bias",
                                      "mask_k_bias", "layernorm_eps", "swiglu_unpacked",
                                      "ffn_align", "untie_local_cls_norm", "mlp_ratio")}
    dinov3.update({k: student[k] or None for k in ("rope_min_period", "rope_max_period",
                                                   "rope_shift", "rope_jitter", "rope_rescale")})
    return build_backbone(
        student.arch, **sizes, patch_size=student.patch_size,
        img_size=config.crops.global_crops_size, ffn_layer=student.ffn_layer,
        layerscale=student.layerscale, num_register_tokens=student.num_register_tokens,
        interpolate_offset=student.interpolate_offset,
        interpolate_antialias=student.interpolate_antialias,
        drop_path_rate=student.drop_path_rate, remat_policy=student.remat_policy,
        attention_backend=student.attention, pack_crops=student.pack_crops,
        dtype=jnp.dtype(student.dtype), **dinov3)


def intermediate_layers(model, params, layers, n=1, *, image_shape=None, reshape=False,
                        return_class_token=False, norm=True):
    """`get_intermediate_layers` from the `layers` output (depth, B, T, D) of a forward pass
    with `collect_layers=True`, so that callers that also need the final outputs run the
    backbone once. `image_shape` (H, W) is needed for `reshape`."""
    indices = range(model.depth - n, model.depth) if isinstance(n, int) else n
    results = []
    for index in indices:
        x = layers[index]
        if norm:
            x = nn.LayerNorm(epsilon=model.layernorm_eps, dtype=model.dtype).apply(
                {"params": params["norm"]}, x)
        cls, patches = x[:, 0], x[:, 1 + model.num_register_tokens:]
        if reshape:
            height, width = image_shape
            patches = patches.reshape(x.shape[0], height // model.patch_size,
                                      width // model.patch_size, -1)
        results.append((patches, cls) if return_class_token else patches)
    return tuple(results)


def get_intermediate_layers(model, params, images, n=1, *, reshape=False,
                            return_class_token=False, norm=True):
    """The reference's `get_intermediate_layers`: outputs of the last `n` (or listed) blocks.

    Registers are dropped; patches optionally reshaped to (B, H/p, W/p, D) (channels last).
    """
    out = model.apply({"params": params}, images, collect_layers=True)
    return intermediate_layers(model, params, out["layers"], n, image_shape=images.shape[1:3],
                               reshape=reshape, return_class_token=return_class_token, norm=norm)


def count_params(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
