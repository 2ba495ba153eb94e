"""DINOv3's ViT-7B/16 in its three stages: `:pretrain`, `:gram` (Gram anchoring), `:highres`.

Source: `dinov3/configs/train/dinov3_vit7b16_pretrain.yaml`, `..._gram_anchor.yaml` and
`..._high_res_adapt.yaml` of facebookresearch/dinov3 (its README, "Exact DINOv3 setup").
Append `,smoke` to any stage for a tiny model that runs a few steps on CPU through the same
code paths (`:gram,smoke`; the Gram teacher is then copied from the EMA teacher at step 1).

    python -m dinov2_jax.main --config=configs/dinov3_vit7b16.py:pretrain --workdir=gs://b/pretrain \
        --config.train.dataset='arrayrecord:gs://b/lvd/*.array_record'
    python -m dinov2_jax.main --config=configs/dinov3_vit7b16.py:gram --workdir=gs://b/gram \
        --config.gram.ckpt=gs://b/pretrain --config.student.pretrained_weights=gs://b/pretrain ...
    python -m dinov2_jax.main --config=configs/dinov3_vit7b16.py:highres --workdir=gs://b/hr \
        --config.gram.ckpt=gs://b/gram --config.student.pretrained_weights=gs://b/gram ...

All stages (the YAMLs' shared settings):
- student: ViT-7B/16 (4096 wide, 40 blocks, 32 heads), unpacked SwiGLU of ratio 3 aligned to 64
  (8192 hidden), no qkv bias, masked K bias, LayerNorm eps 1e-5, 4 storage tokens, a separate
  norm for the local crops' cls token, RoPE base 100 with coordinate rescale 2 (the training-time
  "box jittering"), LayerScale 1e-5, drop path 0.4, bf16 compute; the scanned blocks
  rematerialised (`dots_no_batch` in pretraining for DINOv3's selective checkpointing, `full` in
  the later stages as DINOv3's `checkpointing_full`). DINOv3's fp8 block matmuls are not here.
- heads: DINO 3 layers, 8192 hidden, 512 bottleneck, 262,144 prototypes; separate iBOT head,
  4096 hidden, 384 bottleneck, 98,304 prototypes; Sinkhorn-Knopp; KoLeo 0.1; DINO in DINOv3's
  form with same-view global pairs left out.
- optimiser: gradient clip 30, layer-wise decay 0.98, patch-embed lr x0.2, AdamW betas
  (0.9, 0.99); schedules v2 (`schedules.version="dinov3"`, lr in DINOv3's units, scaled by
  4 * sqrt(B / 1024)); epochs of 1,000 iterations.
- crops: 2 x 256 + 8 x 112, no horizontal flips; FSDP over all devices.

Stages (DINOv3 counts iterations across stages, 0 -> 1M -> 1.2M; here each stage is its own
run from step 0, so the YAMLs' schedules are shifted to the stage's start):
- pretrain: 1,000 epochs (1M iterations), batch 4096 (16 x 256 GPUs); lr 0 -> 5e-5 over 100
  epochs, then constant; weight decay 0.04, momentum 0.994 constant; teacher temperature
  0.04 -> 0.07 over 100 epochs; last layer frozen 5 epochs.
- gram: 200 epochs (DINOv3's iterations 1M -> 1.2M), batch 4096; lr 3e-5, momentum 0.999, teacher
  temperature 0.07, constant (DINOv3's warm-ups ended before 1M); Gram loss per image
  (`img_level`), its weight rising along a cosine from 0 to 2.0 over the first epoch, then
  constant; the local-crop DINO weight 1 -> 0.5 along the same cosine; the Gram teacher from
  `gram.ckpt` (the pretraining workdir's EMA teacher, as DINOv3's `gram.ckpt`), refreshed from
  the EMA teacher every 10,000 iterations from iteration 10,000 (DINOv3's 1,010,000), at most 3
  times; Gram crops of 512 px (the global boxes at twice the size) without distortions, the
  Gram teacher's patch map resized to the student's grid (bicubic, no antialias).
- highres: 30 epochs, batch 2048 (8 x 256); lr along a cosine from 0 to 1.25e-5 over 10
  epochs, then constant; weight decay 0.04, momentum 0.999, teacher temperature 0.07; last
  layer not frozen; Gram weight 1.5 with a fixed Gram teacher (the gram stage's workdir); local
  DINO weight 0.5; distributed KoLeo in groups of 16 images. DINOv3 mixes five (global, local,
  Gram) sizes per batch: (512, 112, 768) x 0.3, (768, 112, 1152) x 0.3, (768, 168, 1152) x 0.3,
  (768, 224, 1152) x 0.05, (768, 336, 1152) x 0.05; this recipe trains the first.
The student of a later stage starts from the previous stage's teacher backbone
(`student.pretrained_weights`, heads fresh); DINOv3 resumes the whole run, heads included.
"""
from dinov2_jax import configs

STAGES = ("pretrain", "gram", "highres")


def _shared():
    config = configs.default_config()
    config.student.update(
        arch="vit_7b", patch_size=16, ffn_layer="swiglu", swiglu_unpacked=True, mlp_ratio=3.0,
        ffn_align=64, qkv_bias=False, mask_k_bias=True, layernorm_eps=1e-5,
        num_register_tokens=4, untie_local_cls_norm=True, pos_embed="rope", rope_base=100.0,
        rope_normalize="separate", rope_rescale=2.0, layerscale=1e-5, drop_path_rate=0.4,
        dtype="bfloat16", remat_policy="dots_no_batch")
    config.dino.update(head_n_prototypes=262144, head_bottleneck_dim=512, head_hidden_dim=8192,
                       head_nlayers=3, koleo_loss_weight=0.1, loss_form="dinov3",
                       global_ignore_diagonal=True)
    config.ibot.update(separate_head=True, head_n_prototypes=98304, head_bottleneck_dim=384,
                       head_hidden_dim=4096, head_nlayers=3)
    config.train.update(batch_size=4096, epoch_length=1000, centering="sinkhorn_knopp",
                        dataset="arrayrecord:/data/lvd1689m/*.array_record",
                        checkpoint_every=1000)
    config.optim.update(clip_grad=30.0, layerwise_decay=0.98, patch_embed_lr_mult=0.2,
                        adamw_beta1=0.9, adamw_beta2=0.99)
    config.crops.update(global_crops_size=256, local_crops_size=112, local_crops_number=8,
                        horizontal_flips=False)
    config.mesh.update(data=1, fsdp=-1)
    return config


def _pretrain(config):
    config.optim.update(epochs=1000, freeze_last_layer_epochs=5)
    config.schedules.update(version="dinov3", lr=(0.0, 5e-5, 5e-5, 100, -1),
                            weight_decay=(0.04, 0.04, 0.04, 0, -1),
                            momentum=(0.994, 0.994, 0.994, 0, -1),
                            teacher_temp=(0.04, 0.07, 0.07, 100, -1))
    return config


def _later_stage(config, epochs, lr):
    config.student.remat_policy = "full"
    config.optim.update(epochs=epochs, freeze_last_layer_epochs=0)
    config.schedules.update(version="dinov3", lr=lr, weight_decay=(0.04, 0.04, 0.04, 0, -1),
                            momentum=(0.999, 0.999, 0.999, 0, -1),
                            teacher_temp=(0.07, 0.07, 0.07, 0, -1))
    config.gram.update(use_loss=True, img_level=True, normalized=True)
    return config


def _gram(config):
    config = _later_stage(config, 200, (3e-5, 3e-5, 3e-5, 0, -1))
    config.gram.update(loss_weight_schedule=(0.0, 0.0, 2.0, 0, 1), rep_update=True,
                       update_frequency=10000, it_first_update=10000, max_updates=3)
    config.dino.local_loss_weight_schedule = (1.0, 1.0, 0.5, 0, 1)
    config.crops.update(gram_teacher_crops_size=512, gram_teacher_no_distortions=True)
    return config


def _highres(config):
    config = _later_stage(config, 30, (0.0, 0.0, 1.25e-5, 0, 10))
    config.train.update(batch_size=2048, checkpoint_every=250)
    config.gram.update(loss_weight=1.5, rep_update=False)
    config.dino.update(local_loss_weight_schedule=(0.5, 0.5, 0.5, 0, 0),
                       koleo_loss_distributed=True, koleo_distributed_loss_group_size=16)
    config.crops.update(global_crops_size=512, local_crops_size=112, gram_teacher_crops_size=768,
                        gram_teacher_no_distortions=True)
    return config


def _smoke(config):
    """configs.smoke, with the stage's schedule blocks and Gram settings shrunk to its steps."""
    config = configs.smoke(config)
    config.optim.freeze_last_layer_epochs = min(config.optim.freeze_last_layer_epochs, 1)
    for name in ("lr", "weight_decay", "momentum", "teacher_temp"):
        start, peak, end, warmup, cosine = config.schedules[name]
        config.schedules[name] = (start, peak, end, min(warmup, 1), min(cosine, 1))
    config.dino.koleo_distributed_loss_group_size = 0
    if config.gram.use_loss:
        config.gram.update(it_load_ema_teacher=1, update_frequency=2, it_first_update=2)
        if config.crops.gram_teacher_crops_size:
            config.crops.gram_teacher_crops_size = 2 * config.crops.global_crops_size
    return config


def get_config(arg=None):
    stage, _, smoke = (arg or "").partition(",")
    if stage not in STAGES or smoke not in ("", "smoke"):
        raise ValueError(f"configs/dinov3_vit7b16.py takes STAGE or STAGE,smoke with STAGE one "
                         f"of {STAGES}, got {arg!r}")
    config = {"pretrain": _pretrain, "gram": _gram, "highres": _highres}[stage](_shared())
    return _smoke(config) if smoke else config
