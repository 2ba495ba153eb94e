"""dinov2_jax.flops: the model FLOPs of a train step and the peak FLOP/s table."""
import types

import jax
import jax.numpy as jnp
import pytest

from dinov2_jax import configs, flops, parallel
from dinov2_jax.data import masking
from dinov2_jax.train import setup as setup_lib
from dinov2_jax.train import state as state_lib, step as step_lib


def test_vitl14_hand_count():
    """The `vitl14` recipe at 32 images per device, counted by hand.

    ViT-L/14: D = 1024, 24 blocks, SwiGLU hidden h = 2736 (2/3 of 4096 rounded up to 8).
    Global crop 224 px: 256 patches, T = 257 tokens; local crop 98 px: 49 patches, T = 50.
    Forward FLOPs (2 per multiply-add) of one block on T tokens:
      qkv 6TD^2 + q.k and attn.v 4T^2D + proj 2TD^2 + SwiGLU (w12 4TDh + w3 2TDh)
      global: 2,155,872,256 + 270,536,704 + 4,320,165,888 = 6,746,574,848
      local:    419,430,400 +  10,240,000 +   840,499,200 = 1,270,169,600
    Patch embedding (a matmul of 3p^2 = 588 inputs): 2 * 256 * 588 * D = 308,281,344 per
    global crop, 59,006,976 per local crop. Backbone forward: global 162,226,077,696, local
    30,543,077,376.
    Heads, per row: DINO (1024 -> 2048 -> 2048 -> 384, prototypes 384 x 131072)
    114,819,072; iBOT (separate, bottleneck 256) 80,740,352. The masked-patch buffer has the
    reference's upperbound U = 2,496 rows for 64 global crops, all executed.
    Teacher: 64 * (global + DINO row) + U * iBOT row = 10,591.3 GFLOP.
    Student forward, drop path 0.4 with the reference's subset sizes (38 of 64 global and 153
    of 256 local crops run the blocks; patch embedding for all): 6,172.6 (global) + 4,679.2
    (local) + 320 DINO rows 36.7 + U iBOT rows 201.5 = 11,090.0 GFLOP; x3 for backward.
    Total 43,861.5 GFLOP per step, 1,370.7 GFLOP per image.

    Issue 9 says "about 1,380 GFLOP per image actually executed, drop path included": that is
    this count with a keep fraction of exactly 0.6 (38.4 of 64, 153.6 of 256 crops), 1,378.5
    GFLOP. The reference keeps int(b * 0.6) samples, so 1,370.7 is the executed count (0.6%
    less). Without drop path it would be 2,059.7 GFLOP per image. (At batch 64 the count is
    1,371.8 GFLOP per image, so the reference's 153 img/s there is 21.2% of an H100's 989
    TFLOP/s, not the 26% issue 9 quotes; twice the reference is 42.4% MFU.)
    """
    config = configs.load("configs/vitl14.py")
    networks = state_lib.build_networks(config)
    upperbound = masking.mask_upperbound(64, 256, config.ibot.mask_ratio_min_max,
                                         config.ibot.mask_sample_probability)
    assert upperbound == 2496

    dim, depth, hidden, patch_inputs = 1024, 24, 2736, 3 * 14 * 14

    def block(tokens):
        return 8 * tokens * dim**2 + 4 * tokens**2 * dim + 6 * tokens * dim * hidden

    embed_global, embed_local = 2 * 256 * patch_inputs * dim, 2 * 49 * patch_inputs * dim
    dino_row = 2 * (dim * 2048 + 2048 * 2048 + 2048 * 384) + 2 * 384 * 131072
    ibot_row = 2 * (dim * 2048 + 2048 * 2048 + 2048 * 256) + 2 * 256 * 131072
    assert (block(257), block(50)) == (6_746_574_848, 1_270_169_600)
    assert (dino_row, ibot_row) == (114_819_072, 80_740_352)
    teacher = 64 * (embed_global + depth * block(257) + dino_row) + upperbound * ibot_row
    student = (64 * embed_global + 38 * depth * block(257) + 256 * embed_local
               + 153 * depth * block(50) + 320 * dino_row + upperbound * ibot_row)
    hand_count = teacher + 3 * student
    assert hand_count == 43_861_479_849_984

    assert flops.train_step_flops(networks, config, 32, upperbound) == pytest.approx(
        hand_count, rel=1e-12)
    assert hand_count / 32 / 1e9 == pytest.approx(1370.67, abs=0.01)
    assert hand_count / 32 / 1e9 == pytest.approx(1380, rel=0.01)  # issue 9's round figure


def _small_config(drop_path_rate, ffn_layer, separate_head):
    """One block (XLA's cost analysis counts a scanned block once), big enough for matmuls to
    dominate the elementwise work XLA also counts."""
    config = configs.default_config()
    config.student.update(arch="vit_small", embed_dim=192, depth=1, num_heads=3, patch_size=8,
                          drop_path_rate=drop_path_rate, ffn_layer=ffn_layer, dtype="float32")
    head = dict(head_n_prototypes=4096, head_bottleneck_dim=64, head_hidden_dim=256)
    config.dino.update(head)
    config.ibot.update(head, separate_head=separate_head)
    config.crops.update(global_crops_size=64, local_crops_size=32, local_crops_number=4)
    config.train.update(batch_size=8, centering="sinkhorn_knopp")
    return config


@pytest.mark.parametrize("drop_path_rate,ffn_layer,separate_head", [
    (0.0, "mlp", False), (0.4, "swiglu", True)])
def test_count_matches_the_executed_step(drop_path_rate, ffn_layer, separate_head):
    """XLA's own count of the lowered train step (every dot, including the backward, plus the
    elementwise work, the losses and the optimizer) is 0-3% above ours. With drop path 0.4 the
    step's HLO holds the kept subset only, and the two counts still agree: the skip is real."""
    config = _small_config(drop_path_rate, ffn_layer, separate_head)
    setup = setup_lib.build(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
    networks = setup.networks
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), setup.abstract_state)
    b, crops = config.train.batch_size, config.crops
    tokens = (crops.global_crops_size // config.student.patch_size) ** 2
    upperbound = masking.mask_upperbound(2 * b, tokens, config.ibot.mask_ratio_min_max,
                                         config.ibot.mask_sample_probability)
    spec = jax.ShapeDtypeStruct
    batch = {
        "global_crops": spec((2, b, crops.global_crops_size, crops.global_crops_size, 3),
                             jnp.float32),
        "local_crops": spec((crops.local_crops_number, b, crops.local_crops_size,
                             crops.local_crops_size, 3), jnp.float32),
        "masks": spec((2, b, tokens), bool),
        "mask_indices": spec((1, upperbound), jnp.int32),
        "masks_weight": spec((1, upperbound), jnp.float32),
    }
    step = step_lib.make_train_step(networks, config, setup.optimizer, setup.schedules)
    executed = jax.jit(step).lower(state, batch).cost_analysis()["flops"]
    counted = setup.step_flops(upperbound)
    assert 1.0 <= executed / counted <= 1.04, executed / counted
    if drop_path_rate:
        without = flops.train_step_flops(
            state_lib.build_networks(_small_config(0.0, ffn_layer, separate_head)), config, b,
            upperbound)
        assert counted < 0.8 * without


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, peak):
    device = types.SimpleNamespace(device_kind=kind)
    assert flops.peak_flops_per_device(device) == peak
    assert flops.peak_flops_per_device(device, override=123e12) == 123e12
