"""DINOv3's small reproducible recipe: ViT-L/16 with RoPE on ImageNet-1k, 100 epochs.

Source: `dinov3/configs/train/vitl_im1k_lin834.yaml` of facebookresearch/dinov3. Its README
reports 82.0 k-NN / 83.5 linear on ImageNet-1k after ~14 h on 32 H100s; the YAML's own header
says 82.2 k-NN / 83.3 linear at 0.57 s/iteration on 32 GPUs (batch 64 each).

    python -m dinov2_jax.main --config=configs/dinov3_vitl16_im1k.py --workdir=gs://bucket/run
    python -m dinov2_jax.main --config=configs/dinov3_vitl16_im1k.py:smoke --workdir=/tmp/run

The settings, each the YAML's:
- student: ViT-L/16 (1024 wide, 24 blocks, 16 heads, MLP FFN ratio 4), RoPE (base 100,
  coordinates normalised per axis, no shift/jitter/rescale augmentation), no storage tokens,
  qkv bias without the K mask, LayerNorm eps 1e-6, LayerScale 1e-5, drop path 0.3 (batch
  subset), bf16 compute.
- heads: DINO and a separate iBOT head, each 3 layers, 2048 hidden, 256 bottleneck, 65,536
  prototypes; Sinkhorn-Knopp centering; KoLeo 0.1.
- DINO loss in DINOv3's form (`dinov3/train/ssl_meta_arch.py:compute_losses`): pair means split
  by pair counts, same-view global pairs left out (`global_ignore_diagonal`).
- iBOT: mask probability 0.5, ratio 0.1-0.5.
- 100 epochs of 1,250 iterations, global batch 2048; the DINOv2-style cosine schedules (the
  YAML has no `schedules:` block): lr 0.001 in DINOv3's units, i.e. base_lr 0.004 here (DINOv3's
  sqrt_wrt_1024 multiplies by 4 * sqrt(B / 1024), DINOv2's by sqrt(B / 1024)), 10 warm-up epochs,
  min 1e-6; weight decay 0.04 -> 0.4; teacher momentum 0.992 -> 1; teacher temperature
  0.04 -> 0.07 over 30 epochs; last layer frozen 1 epoch; layer-wise decay 0.9, patch-embed
  lr x0.2, gradient clip 3.0, AdamW betas (0.9, 0.999).
- crops: 2 x 224 (scale 0.32-1) + 8 x 96 (0.05-0.32), horizontal flips.
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.default_config()
    config.student.update(arch="vit_large", patch_size=16, drop_path_rate=0.3, layerscale=1e-5,
                          ffn_layer="mlp", pos_embed="rope", rope_base=100.0,
                          rope_normalize="separate", num_register_tokens=0, qkv_bias=True,
                          mask_k_bias=False, dtype="bfloat16")
    config.dino.update(head_n_prototypes=65536, head_bottleneck_dim=256, head_hidden_dim=2048,
                       koleo_loss_weight=0.1, loss_form="dinov3", global_ignore_diagonal=True)
    config.ibot.update(separate_head=True, head_n_prototypes=65536, head_bottleneck_dim=256,
                       head_hidden_dim=2048)
    config.train.update(batch_size=2048, epoch_length=1250, centering="sinkhorn_knopp",
                        dataset="tfds:imagenet2012:train")
    config.teacher.update(momentum_teacher=0.992, final_momentum_teacher=1.0,
                          warmup_teacher_temp=0.04, teacher_temp=0.07,
                          warmup_teacher_temp_epochs=30)
    config.optim.update(epochs=100, warmup_epochs=10, base_lr=0.004, min_lr=1e-6,
                        weight_decay=0.04, weight_decay_end=0.4, layerwise_decay=0.9,
                        patch_embed_lr_mult=0.2, clip_grad=3.0, freeze_last_layer_epochs=1,
                        adamw_beta1=0.9, adamw_beta2=0.999)
    config.crops.update(global_crops_size=224, local_crops_size=96, local_crops_number=8,
                        horizontal_flips=True)
    if arg == "smoke":
        return configs.smoke(config)
    if arg:
        raise ValueError(f"configs/dinov3_vitl16_im1k.py takes no arg or 'smoke', got {arg!r}")
    return config
