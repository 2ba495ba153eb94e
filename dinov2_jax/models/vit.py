"""The DINOv2 Vision Transformer (spec §1) in Flax Linen.

Patch embedding, cls/register/mask tokens, position-embedding interpolation exactly as the
reference, pre-norm blocks (attention, Mlp or SwiGLU, LayerScale) scanned with `nn.scan` and
rematerialised with `nn.remat`, drop path with the batch-subset trick at static shapes, and
outputs as a dict of named intermediates. A list of image batches (the student's global and
local crops) runs as token groups through the same scanned blocks: one group after another, or,
with `pack_crops`, packed into equal sequences of block-diagonal attention (`PackLayout`), so that
every block runs one attention call and one set of matmuls over the tokens of all groups.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dinov2_jax.models import attention

# Sizes of the reference constructors (spec §1.1).
ARCHS = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
}

# The eight torch.hub backbones (spec §1.8): construction size 518, LayerScale 1.0.
_HUB_BASE = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2"}
HUB_MODELS = {}
for _name, _arch in _HUB_BASE.items():
    _common = dict(arch=_arch, patch_size=14, img_size=518, layerscale=1.0,
                   ffn_layer="swiglu" if _arch == "vit_giant2" else "mlp")
    HUB_MODELS[_name] = dict(_common, num_register_tokens=0, interpolate_offset=0.1,
                             interpolate_antialias=False)
    HUB_MODELS[_name + "_reg"] = dict(_common, num_register_tokens=4, interpolate_offset=0.0,
                                      interpolate_antialias=True)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Initialisers of the reference (spec §1.5). torch's trunc_normal_ cuts at +-2 absolute,
# i.e. +-100 sigma for std 0.02, so a plain normal has the same distribution.
dense_init = nn.initializers.normal(0.02)


def torch_default_uniform(fan_in):
    """PyTorch's default Linear/Conv init: U(+-1/sqrt(fan_in)), for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def swiglu_hidden_dim(embed_dim, mlp_ratio):
    """Hidden width of the reference SwiGLU: 2/3 of the mlp width, rounded up to 8."""
    hidden = int(embed_dim * mlp_ratio)
    return ((int(hidden * 2 / 3) + 7) // 8) * 8


# --------------------------------------------------------------------------------------------
# Position-embedding interpolation (spec §1.3).


def _keys_cubic_matrix(out_size, in_size, inv_scale, a=-0.75):
    """(out, in) weights of torch's bicubic (align_corners=False, no antialias).

    Keys cubic with A=-0.75, taps floor(src)-1..floor(src)+2 clamped to the edges, and source
    coordinate src = (dst + 0.5) * inv_scale - 0.5.
    """
    matrix = np.zeros((out_size, in_size), np.float64)
    for dst in range(out_size):
        src = (dst + 0.5) * inv_scale - 0.5
        floor = math.floor(src)
        t = src - floor
        weights = (
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        )
        for tap, weight in zip(range(floor - 1, floor + 3), weights):
            matrix[dst, min(max(tap, 0), in_size - 1)] += weight
    return matrix


def _keys_kernel(x, a):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _antialias_cubic_matrix(out_size, in_size, inv_scale, a=-0.5):
    """(out, in) weights of torch's bicubic with antialias=True (a PIL-style filter).

    Keys a=-0.5 stretched by max(inv_scale, 1), support 2*max(inv_scale, 1), normalised.
    """
    stretch = max(inv_scale, 1.0)
    support = 2.0 * stretch
    matrix = np.zeros((out_size, in_size), np.float64)
    for dst in range(out_size):
        center = inv_scale * (dst + 0.5)
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        taps = [_keys_kernel((j - center + 0.5) / stretch, a) for j in range(first, last)]
        matrix[dst, first:last] = np.asarray(taps) / np.sum(taps)
    return matrix


def interpolate_pos_embed(pos_embed, grid_h, grid_w, *, offset, antialias, square_input=True):
    """Resamples a (1, 1+M*M, D) table to a (grid_h, grid_w) patch grid like the reference.

    The table is returned unchanged when the grid is the table's own and the input is square.
    `offset` != 0 samples with scale (grid + offset) / M (the reference's scale_factor path);
    `antialias` is the PIL-style filter of the register models. Computed in float32.
    """
    num_table = pos_embed.shape[1] - 1
    side = int(math.sqrt(num_table))
    if side * side != num_table:
        raise ValueError(f"pos_embed has {num_table} patch positions, not a square grid")
    if grid_h * grid_w == num_table and square_input:
        return pos_embed
    cls_pos = pos_embed[:, :1]
    table = pos_embed[0, 1:].astype(jnp.float32).reshape(side, side, -1)
    scale_h = (grid_h + offset) / side if offset else grid_h / side
    scale_w = (grid_w + offset) / side if offset else grid_w / side
    weights = _antialias_cubic_matrix if antialias else _keys_cubic_matrix
    rows = jnp.asarray(weights(grid_h, side, 1 / scale_h), jnp.float32)
    cols = jnp.asarray(weights(grid_w, side, 1 / scale_w), jnp.float32)
    table = jnp.einsum("ym,xn,mnd->yxd", rows, cols, table, precision=jax.lax.Precision.HIGHEST)
    table = table.reshape(1, grid_h * grid_w, -1).astype(pos_embed.dtype)
    return jnp.concatenate([cls_pos, table], axis=1)


# --------------------------------------------------------------------------------------------
# Drop path.


def _keep_count(batch, rate):
    """The reference's drop-path subset size S = max(int(b * (1 - rate)), 1)."""
    return max(int(batch * (1 - rate)), 1)


def _drop_path_add(x, branch, rate, rng):
    """x + branch(x) with the reference's batch-subset stochastic depth.

    Keeps a random subset of S = max(int(b * (1 - rate)), 1) samples, computes the branch on
    them only, and adds it back scaled by b / S. S is static, so shapes are too.
    """
    if rng is None or rate <= 0:
        return x + branch(x)
    batch = x.shape[0]
    keep = _keep_count(batch, rate)
    kept = jax.random.permutation(rng, batch)[:keep]
    residual = branch(x[kept]) * jnp.asarray(batch / keep, x.dtype)
    return x.at[kept].add(residual)


# --------------------------------------------------------------------------------------------
# Sequence packing.


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """A static plan that packs the rows (crops) of token groups into equal sequences.

    Group g has `rows[g]` rows of `lengths[g]` tokens. Sequence s holds its consecutive rows
    s*k .. s*k + k - 1, k = `slots[g]` = ceil(rows[g] / sequences), the groups one after
    another, so all sequences share one segment layout (`segment_lengths`, one segment per
    row). Packing is a reshape and a concatenation along the tokens, so rows sharded over d
    devices stay on their device when d divides `sequences`. Slots past a group's last row are
    padding rows of zeros, segments of their own whose outputs are dropped. For image-major
    groups (row = image * crops + crop) a sequence holds crops of one image.
    """
    rows: tuple[int, ...]
    lengths: tuple[int, ...]
    sequences: int

    @property
    def slots(self):
        return tuple(-(-n // self.sequences) for n in self.rows)

    @property
    def sequence_length(self):
        return sum(k * t for k, t in zip(self.slots, self.lengths))

    @property
    def padding_tokens(self):
        return sum((k * self.sequences - n) * t
                   for n, k, t in zip(self.rows, self.slots, self.lengths))

    @property
    def segment_lengths(self):
        return sum(((t,) * k for k, t in zip(self.slots, self.lengths)), ())

    def pack(self, groups):
        """Groups of (rows[g], lengths[g], C) -> (sequences, sequence_length, C)."""
        packed = []
        for x, k, t in zip(groups, self.slots, self.lengths):
            x = jnp.pad(x, ((0, k * self.sequences - x.shape[0]), (0, 0), (0, 0)))
            packed.append(x.reshape(self.sequences, k * t, x.shape[-1]))
        return jnp.concatenate(packed, axis=1)

    def unpack(self, packed):
        """The inverse of `pack`: the groups, without the padding rows."""
        splits = np.cumsum([k * t for k, t in zip(self.slots, self.lengths)])[:-1]
        return [x.reshape(k * self.sequences, t, x.shape[-1])[:n]
                for x, n, k, t in zip(jnp.split(packed, splits, axis=1), self.rows, self.slots,
                                      self.lengths)]


def plan_packing(rows, lengths, max_length=None):
    """The PackLayout with the fewest padding tokens, sequences no longer than `max_length`.

    Ties go to shorter sequences. `max_length` defaults to the length of the layout with
    gcd(rows) sequences, the shortest one without padding rows (which is then the plan).
    """
    rows, lengths = tuple(rows), tuple(lengths)
    if max_length is None:
        max_length = PackLayout(rows, lengths, math.gcd(*rows)).sequence_length
    layouts = (PackLayout(rows, lengths, p) for p in range(1, max(rows) + 1))
    return min((layout for layout in layouts if layout.sequence_length <= max_length),
               key=lambda layout: (layout.padding_tokens, layout.sequence_length))


def _packed_drop_path_add(groups, branch, rate, rngs, max_length):
    """Each group plus `branch(packed, segment_lengths)` run once on the kept rows of all groups.

    Batch-subset drop path per group: a random subset of S = max(int(b * (1 - rate)), 1) rows,
    drawn with the group's key in `rngs` as `_drop_path_add` draws it, is packed with the other
    groups' kept rows into sequences no longer than `max_length`; the branch output is added
    back to those rows scaled by b / S.
    """
    kept = [jax.random.permutation(rng, x.shape[0])[:_keep_count(x.shape[0], rate)]
            for x, rng in zip(groups, rngs)]
    layout = plan_packing([k.shape[0] for k in kept], [x.shape[1] for x in groups], max_length)
    residuals = layout.unpack(branch(layout.pack([x[k] for x, k in zip(groups, kept)]),
                                     layout.segment_lengths))
    return [x.at[k].add(y * jnp.asarray(x.shape[0] / k.shape[0], x.dtype))
            for x, k, y in zip(groups, kept, residuals)]


# --------------------------------------------------------------------------------------------
# Blocks.


class LayerScale(nn.Module):
    """Per-channel scale `gamma`, initialised to `init_values`."""
    init_values: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (q|k|v, heads contiguous).

    `segment_lengths` (static, summing to the tokens) makes attention block-diagonal over
    packed crops, the same layout in every sequence.
    """
    num_heads: int
    backend: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, segment_lengths=None):
        batch, length, dim = x.shape
        qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=dense_init, name="qkv")(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        out = attention.dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], segment_lengths=segment_lengths,
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


class Block(nn.Module):
    """Pre-norm transformer block applied to a tuple of token groups; a `nn.scan` body.

    Each group (e.g. global and local crops) has its own batch and length; they share the
    weights, and drop path draws an independent subset per group and per branch. Unpacked, the
    groups run one after another; with `pack_crops`, each branch runs once on the (kept) rows of
    all groups packed by `plan_packing` (with drop path: sequences no longer than those of the
    full groups). Both consume the dropout rng alike, so they give equal results. Returns the
    new groups as the scan carry and, when `collect`, also as the scan output.
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

    @nn.compact
    def __call__(self, groups, _):
        norm1 = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")
        norm2 = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")
        attn = Attention(self.num_heads, self.attention_backend, self.dtype, name="attn")
        ffn_cls = {"mlp": Mlp, "swiglu": SwiGLU}[self.ffn_layer]
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
        if self.pack_crops:
            outputs = self._packed(groups, rngs if use_drop else None,
                                   lambda y, lengths: ls1(attn(norm1(y), lengths)),
                                   lambda y, _: ls2(ffn(norm2(y))))
        else:
            outputs = []
            for x, (attn_rng, ffn_rng) in zip(groups, rngs):
                x = _drop_path_add(x, lambda y: ls1(attn(norm1(y))), self.drop_path_rate, attn_rng)
                x = _drop_path_add(x, lambda y: ls2(ffn(norm2(y))), self.drop_path_rate, ffn_rng)
                outputs.append(x)
        outputs = tuple(outputs)
        return outputs, (outputs if self.collect else None)

    def _packed(self, groups, rngs, attn_branch, ffn_branch):
        """Both residual branches, each one call over the packed (kept) rows of all groups."""
        layout = plan_packing([x.shape[0] for x in groups], [x.shape[1] for x in groups])
        if rngs is None:
            x = layout.pack(groups)
            x = x + attn_branch(x, layout.segment_lengths)
            return layout.unpack(x + ffn_branch(x, layout.segment_lengths))
        groups = _packed_drop_path_add(groups, attn_branch, self.drop_path_rate,
                                       [r[0] for r in rngs], layout.sequence_length)
        return _packed_drop_path_add(groups, ffn_branch, self.drop_path_rate,
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
    on them (see `PackLayout`, `plan_packing`). Without drop path there are gcd(group batches)
    sequences of consecutive rows: for the student's [2B global, n_local*B local] crops, one
    global and n_local/2 local crops each (of one image if the rows are image-major); with drop
    path the kept rows of the groups are packed. Same outputs as unpacked; which is faster
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

    def _validate(self):
        if self.ffn_layer not in ("mlp", "swiglu"):
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', got {self.ffn_layer!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                             f"got {self.remat_policy!r}")

    def _block_kwargs(self):
        hidden = (swiglu_hidden_dim(self.embed_dim, self.mlp_ratio) if self.ffn_layer == "swiglu"
                  else int(self.embed_dim * self.mlp_ratio))
        return dict(num_heads=self.num_heads, ffn_layer=self.ffn_layer, ffn_hidden_dim=hidden,
                    layerscale=self.layerscale, drop_path_rate=self.drop_path_rate,
                    attention_backend=self.attention_backend, pack_crops=self.pack_crops,
                    dtype=self.dtype)

    def _embedding_params(self):
        dim, patch = self.embed_dim, self.patch_size
        grid = self.img_size // patch
        patch_embed = nn.Conv(
            dim, (patch, patch), strides=(patch, patch), padding="VALID", dtype=self.dtype,
            kernel_init=torch_default_uniform(3 * patch * patch),
            bias_init=torch_default_uniform(3 * patch * patch), name="patch_embed")
        tokens = dict(
            cls=self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim)),
            pos=self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + grid * grid, dim)),
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
        pos = interpolate_pos_embed(tokens["pos"], height // patch, width // patch,
                                    offset=self.interpolate_offset,
                                    antialias=self.interpolate_antialias,
                                    square_input=height == width)
        x = x + pos.astype(x.dtype)
        if tokens["registers"] is not None:
            registers = jnp.broadcast_to(tokens["registers"].astype(x.dtype),
                                         (batch, self.num_register_tokens, self.embed_dim))
            x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
        return x

    def _blocks(self, groups, train, collect):
        body = Block
        if self.remat_policy != "none":
            body = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        stack = nn.scan(
            body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(**self._block_kwargs(), train=train, collect=collect, name="blocks")(
            groups, None)

    def _outputs(self, norm, x_prenorm, masks, layers):
        r = self.num_register_tokens
        x_norm = norm(x_prenorm)
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
        groups, layers = self._blocks(groups, train, collect_layers)
        norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")
        outputs = [self._outputs(norm, x, m, None if layers is None else layers[i])
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


def get_intermediate_layers(model, params, images, n=1, *, reshape=False,
                            return_class_token=False, norm=True):
    """The reference's `get_intermediate_layers`: outputs of the last `n` (or listed) blocks.

    Registers are dropped; patches optionally reshaped to (B, H/p, W/p, D) (channels last).
    """
    out = model.apply({"params": params}, images, collect_layers=True)
    layers = out["layers"]
    indices = range(model.depth - n, model.depth) if isinstance(n, int) else n
    results = []
    for index in indices:
        x = layers[index]
        if norm:
            x = nn.LayerNorm(epsilon=1e-6, dtype=model.dtype).apply({"params": params["norm"]}, x)
        cls, patches = x[:, 0], x[:, 1 + model.num_register_tokens:]
        if reshape:
            batch, height, width, _ = images.shape
            patches = patches.reshape(batch, height // model.patch_size,
                                      width // model.patch_size, -1)
        results.append((patches, cls) if return_class_token else patches)
    return tuple(results)


def count_params(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
