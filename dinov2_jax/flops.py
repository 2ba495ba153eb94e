"""Model FLOPs of a DINOv2 train step and the peak FLOP/s of accelerators, for MFU.

Counted as docs/reference.md, Train step defines them: matmuls and attention (2 FLOPs per
multiply-add) of the teacher forward on the 2 global crops and its heads, plus the student
forward and backward (3x forward) on all crops and heads. Drop path's batch-subset trick really
skips compute, so the student's block FLOPs count only the kept samples
(`packing.drop_path_keep_count`). Norms, softmax and elementwise work are not counted. A
distillation step (`train/distill.py`) is the frozen teacher's forward once plus each student's.
"""
import jax

from dinov2_jax.models import packing, vit

# Dense bf16 peak FLOP/s per device (vendor datasheets). GPUs: the first name contained in
# jax's device_kind wins (e.g. "NVIDIA H100 80GB HBM3" is an SXM H100, "NVIDIA H100 PCIe" not).
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H200 NVL", 835e12), ("H200", 989e12), ("A100", 312e12),
)
# TPUs by exact device_kind: v5e reports "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
TPU_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device(device=None, override=0.0):
    """Peak FLOP/s of `device` (default: the first), `override` if > 0; None if unknown."""
    if override:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind
    if kind in TPU_PEAK_FLOPS:
        return TPU_PEAK_FLOPS[kind]
    return next((flops for name, flops in GPU_PEAK_FLOPS if name.lower() in kind.lower()), None)


def block_flops(tokens, dim, ffn_hidden, ffn_layer):
    """Forward FLOPs of one transformer block on one sequence of `tokens` tokens."""
    attention = 2 * tokens * dim * 3 * dim + 2 * 2 * tokens * tokens * dim + 2 * tokens * dim * dim
    if ffn_layer == "swiglu":
        ffn = 2 * tokens * dim * 2 * ffn_hidden + 2 * tokens * ffn_hidden * dim
    else:
        ffn = 2 * 2 * tokens * dim * ffn_hidden
    return attention, ffn


def backbone_flops(model, image_size, keep_fraction=1.0):
    """Forward FLOPs of the backbone on one square image; blocks scaled by `keep_fraction`."""
    patches = (image_size // model.patch_size) ** 2
    tokens = 1 + model.num_register_tokens + patches
    hidden = vit.ffn_hidden_dim(model.embed_dim, model.mlp_ratio, model.ffn_layer)
    embed = 2 * patches * 3 * model.patch_size ** 2 * model.embed_dim
    attention, ffn = block_flops(tokens, model.embed_dim, hidden, model.ffn_layer)
    return embed + model.depth * (attention + ffn) * keep_fraction


def head_flops(head, in_dim):
    """Forward FLOPs of a DINOHead on one row."""
    widths = [in_dim] + [head.hidden_dim] * (head.nlayers - 1) + [head.bottleneck_dim]
    mlp = sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
    return mlp + 2 * head.bottleneck_dim * head.out_dim


def teacher_forward_flops(networks, crops, batch_size, patch_rows):
    """Forward FLOPs of a teacher on the 2 global crops of `batch_size` images: backbone, DINO
    head on the cls tokens, patch head on `patch_rows` rows."""
    backbone = networks.backbone
    dim = backbone.embed_dim
    return (2 * batch_size * (backbone_flops(backbone, crops.global_crops_size)
                              + head_flops(networks.dino_head, dim))
            + patch_rows * head_flops(networks.patch_head(), dim))


def student_forward_flops(networks, crops, batch_size, patch_rows):
    """Forward FLOPs of a student on all crops (blocks of the drop-path-kept samples only)
    and its heads, the patch head on `patch_rows` rows."""
    backbone = networks.backbone
    n_global, n_local = 2 * batch_size, crops.local_crops_number * batch_size
    rate = backbone.drop_path_rate
    dim = backbone.embed_dim
    kept = lambda rows: packing.drop_path_keep_count(rows, rate) / rows
    return (n_global * backbone_flops(backbone, crops.global_crops_size, kept(n_global))
            + n_local * backbone_flops(backbone, crops.local_crops_size, kept(n_local))
            + (n_global + n_local) * head_flops(networks.dino_head, dim)
            + patch_rows * head_flops(networks.patch_head(), dim))


def train_step_flops(networks, config, batch_size, masked_rows):
    """Model FLOPs of one train step on `batch_size` images with `masked_rows` buffer rows."""
    return (teacher_forward_flops(networks, config.crops, batch_size, masked_rows)
            + 3 * student_forward_flops(networks, config.crops, batch_size, masked_rows))
