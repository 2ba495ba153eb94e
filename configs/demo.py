"""The demo: a tiny ViT (patch 8, 96 wide, 4 blocks) on the embedded demo dataset.

About 5 minutes on 2 CPU cores (1,500 steps of 64 images), no download; k-NN on the held-out
split at the start (random init) and at the end: top-1 from about 12% (chance is 10%) to about 33%.

Three settings differ from the ViT recipes, for this data and this size:
- LayerScale starts at 1.0, not 1e-5: with 1e-5 four blocks leave the cls token almost the same
  for every image, so the teacher's targets start uniform and teach nothing.
- Colour jitter with full hue and strong saturation (0.5 and 0.8, not 0.1 and 0.2): each demo
  image has its own two random colours, which survive the reference's mild jitter, and the
  features then sort images by colour, which says nothing about the class.
- 40 px global crops and 2 local crops of 24 px: a cheap step, so more of them fit in the time.

    python -m dinov2_jax.main --config=configs/demo.py --workdir=/tmp/dinov2_demo
    python -m dinov2_jax.main --config=configs/demo.py:tiny --workdir=/tmp/t   # seconds, tests
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.default_config()
    config.student.update(arch="vit_small", embed_dim=96, depth=4, num_heads=3, patch_size=8,
                          drop_path_rate=0.1, layerscale=1.0, dtype="float32")
    head = dict(head_n_prototypes=1024, head_bottleneck_dim=64, head_hidden_dim=256)
    config.dino.update(head)
    config.ibot.update(head)
    config.crops.update(global_crops_size=40, local_crops_size=24, local_crops_number=2,
                        color_jitter=(0.4, 0.4, 0.8, 0.5))
    config.train.update(batch_size=64, dataset="demo:train", epoch_length=100, log_every=50,
                        checkpoint_every=100, keep_checkpoints=2, num_workers=1)
    config.teacher.update(momentum_teacher=0.99, warmup_teacher_temp_epochs=2)
    config.optim.update(epochs=15, warmup_epochs=1, base_lr=0.004, layerwise_decay=1.0)
    config.evaluation.update(knn_train="demo:train", knn_val="demo:val", every=0, at_start=True,
                             batch_size=250)
    if arg == "tiny":
        config.student.update(embed_dim=32, depth=2, num_heads=2)
        config.train.update(batch_size=8, epoch_length=4, log_every=2, checkpoint_every=4,
                            num_workers=0)
        config.optim.update(epochs=2, warmup_epochs=1)
        config.teacher.warmup_teacher_temp_epochs = 1
        config.evaluation.update(knn_train="", knn_val="")
    elif arg:
        raise ValueError(f"configs/demo.py takes no arg or 'tiny', got {arg!r}")
    return config
