"""The demo: a tiny ViT (patch 8, 96 wide, 4 blocks) on the embedded demo dataset.

About 10 minutes on 2 CPU cores (600 steps), no download; k-NN on the held-out split at the start
(random init) and at the end.

    python -m dinov2_jax.main --config=configs/demo.py --workdir=/tmp/dinov2_demo
    python -m dinov2_jax.main --config=configs/demo.py:tiny --workdir=/tmp/t   # seconds, tests
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.default_config()
    config.student.update(arch="vit_small", embed_dim=96, depth=4, num_heads=3, patch_size=8,
                          drop_path_rate=0.1, dtype="float32")
    head = dict(head_n_prototypes=1024, head_bottleneck_dim=64, head_hidden_dim=256)
    config.dino.update(head)
    config.ibot.update(head)
    config.crops.update(global_crops_size=48, local_crops_size=24, local_crops_number=4)
    config.train.update(batch_size=64, dataset="demo:train", epoch_length=100, log_every=20,
                        checkpoint_every=100, keep_checkpoints=2, num_workers=1)
    config.teacher.update(momentum_teacher=0.99, warmup_teacher_temp_epochs=2)
    config.optim.update(epochs=6, warmup_epochs=1, base_lr=0.004, layerwise_decay=1.0)
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
