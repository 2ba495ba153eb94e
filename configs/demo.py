"""The demo: a tiny ViT (patch 8, 96 wide, 4 blocks) on the embedded demo dataset.

1,500 steps of 64 images, no download, 8.6 minutes on a quiet 2-core machine (1,020-1,030 s of
CPU time).
k-NN on the held-out split at the start (random init) and at the end: top-1 12.0 -> 22.8
(chance is 10%). The teacher's DINO targets stay sharp and spread over the prototypes to the
end: per-image entropy 0.31 log K and batch-mean entropy 0.54 log K at step 1,500 (metrics
`dino/entropy`, `dino/batch_entropy`), DINO losses 3.15 / 1.59 (local / global; uniform
targets would hold them at 4.62 / 2.31).

Five settings differ from the ViT recipes, for this data and this size:
- The prototypes (the head's last layer) stay frozen for the whole run
  (`optim.freeze_last_layer_epochs` = `optim.epochs`; the reference freezes them for the first
  epoch, when the rest of the network moves fastest). With a 64-dim bottleneck and 1,024
  prototypes, learned prototypes make the DINO head collapse to uniform targets in a few hundred
  steps: the head's MLP maps every image to almost the same direction (pairwise cosine 0.998 at
  the end of such a run while the backbone's cls tokens stay apart, cosine 0.02), the
  per-image teacher entropy climbs to log K and the DINO losses freeze at log K, so the run
  learns through iBOT alone. The reference's own `SSLMetaArch` collapses in the same way on the
  same batches (tests/test_long_parity.py), so it is the recipe at this size, not the step.
  A lower teacher temperature (0.04 or 0.02 throughout), Sinkhorn-Knopp, a higher teacher
  momentum (0.996), a lower or higher lr, larger crops, a separate iBOT head, no KoLeo or no
  iBOT, and wider heads (2,048 hidden) only delay it or make it faster; fixed prototypes stop it.
- The teacher temperature stays at 0.04, the start of the reference's warm-up (which reaches
  0.07 after 30 of 100 epochs), for the whole run: the demo's features separate the images
  only weakly across views, and a sharper teacher keeps its targets image-specific. With both
  settings the per-image entropy stays at 0.66-0.73 log K over steps 100-450 and then falls to
  0.31 log K; the issue-15 recipe (learned prototypes, 0.04 -> 0.07) reached 0.9996 log K and
  k-NN 33.0, which iBOT alone learned: DINO through every objective costs k-NN points here.
- LayerScale starts at 1.0, not 1e-5: with 1e-5 four blocks leave the cls token almost the same
  for every image, so the teacher's targets start uniform and teach nothing.
- Colour jitter with full hue and strong saturation (0.5 and 0.8, not 0.1 and 0.2): each demo
  image has its own two random colours, which survive the reference's mild jitter, and the
  features then sort images by colour, which says nothing about the class.
- 40 px global crops and 2 local crops of 24 px: a cheap step, so more of them fit in the time.

`:highres` is the demo's high-resolution phase: 200 steps at the images' native 64 px (global
crops 64, local 32; the position tables resampled 5x5 -> 8x8) from a trained demo workdir,
`--config.train.init_from=WORKDIR` (required), with the demo's own lr and momentum schedules
compressed to the 200 steps (50 warm-up steps) and the prototypes frozen. k-NN top-1 at 64 px
(the k-NN CLI, --size 64): 18.2 for the demo's teacher (trained at 40 px; 22.8 at 40 px) ->
18.6 after the phase, a gain of two of the 500 val images (base lr 0.001 with momentum 0.995
gave 18.4, base lr 0.002 with momentum 0.98 18.2).

`:distill` distils a smaller student (64 wide, 2 heads; 0.21M backbone parameters, the demo's
0.47M) from a demo run (`--config.distillation.teacher=WORKDIR`, required) for 500 steps:
no masking, no drop path, the frozen teacher's targets balanced by Sinkhorn-Knopp (as in
DINOv3's distillation and the ViT recipes), the EMA student (momentum 0.99, constant) as the
final model; `:small` trains the same student from scratch with the demo's recipe, the
baseline. k-NN top-1 on demo:val after 500 steps (tests/test_distill.py), train.seed 0 / 1:
distilled 25.4 / 25.8, from scratch 19.6 / 15.0 (its EMA teacher; its student 23.2 / 19.8),
the teacher 22.8. Two settings make the difference (the spare EMA does not change the
student's training, so the student network shows the first alone):
- Sinkhorn-Knopp instead of the teacher run's softmax centers: the student network 25.6 on
  seed 0, 20.4 with softmax centering. The frozen teacher's centered targets sit on few
  prototypes (batch-mean entropy 0.53 log K), the balanced ones on all of them (1.00 log K).
  From scratch Sinkhorn-Knopp does not help (18.0).
- A constant EMA momentum of 0.99: the recipe's 0.994 -> 1 (DINOv3's, for runs of hundreds of
  thousands of steps) leaves about a fifth of the random init in the EMA after 500 steps
  (the product of the momenta): the EMA student 23.6 on seed 0 and 19.6 on seed 1 while the
  student network reached 25.6 / 27.6; with 0.99 the EMA follows the student within ~100
  steps.
Tried with softmax centering, all worse than from scratch or within a point of it: teacher
temperature 0.07, 20.0 (with base lr 0.008, 20.0); base lr 0.008, 18.4, and 0.016, 18.2; no
iBOT loss, 18.2; learned prototypes (frozen for the first epoch only), 18.0, and with base lr
0.008, 20.2; the features of a backbone-only teacher, 16.0. The student's frozen prototypes
are the teacher's own (same seed, same head shapes), so its heads can express the targets.

`:natural` trains the same model on `natural:train` (random views of 16 photographs shipped
with scikit-image, dinov2_jax/data/natural.py) with the reference's colour jitter (there colour
belongs to the photograph) and measures k-NN instance retrieval on `natural:val` (which
photograph a view shows; chance 6.25%). After 300 steps: top-1 60.0 at random init -> 75.0,
raw pixels 43.1 (tests/test_natural.py).

`:v3` is the demo with DINOv3's architecture and objective options (`configs/dinov3_*.py` hold
the real recipes): RoPE instead of the learned position table, 4 storage tokens, the DINO loss
in DINOv3's pair-mean form (equal to DINOv2's with same-view pairs left out), and Gram
anchoring from step 750 on: the EMA teacher of that step is copied into the Gram teacher
inside the jitted step, and the per-image Gram loss (weight 1) then holds the student's
patch similarities near it. Measured on a loaded 2-core machine (40 min wall there; 1,331 s of
CPU time against the plain demo's 1,030 s, so about 11 minutes where the plain demo takes 8.6):
k-NN top-1 9.8 at random init -> 21.4 at step 1,500; the Gram loss 0.0345 in its first logged
interval after the copy -> 0.0230 at the end; DINO per-image / batch-mean entropy 0.25 / 0.49
log K. With 1,000 steps and the copy at step 500 it gained only 7.8 points (9.8 -> 17.6).

    python -m dinov2_jax.main --config=configs/demo.py --workdir=/tmp/dinov2_demo
    python -m dinov2_jax.main --config=configs/demo.py:natural --workdir=/tmp/dinov2_natural
    python -m dinov2_jax.main --config=configs/demo.py:highres --workdir=/tmp/dinov2_demo_64 \
        --config.train.init_from=/tmp/dinov2_demo
    python -m dinov2_jax.main --config=configs/demo.py:v3 --workdir=/tmp/dinov2_demo_v3
    python -m dinov2_jax.main --config=configs/demo.py:tiny --workdir=/tmp/t   # seconds, tests
"""
from ml_collections import config_dict

from dinov2_jax import configs

DISTILL_STEPS = 500  # demo.py:distill and demo.py:small


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
    config.teacher.update(momentum_teacher=0.99, teacher_temp=0.04,
                          warmup_teacher_temp_epochs=2)  # 0.04 -> 0.04: no warm-up
    config.optim.update(epochs=15, warmup_epochs=1, base_lr=0.004, layerwise_decay=1.0,
                        freeze_last_layer_epochs=15)
    config.evaluation.update(knn_train="demo:train", knn_val="demo:val", every=0, at_start=True,
                             batch_size=250)
    if arg == "tiny":
        config.student.update(embed_dim=32, depth=2, num_heads=2)
        config.train.update(batch_size=8, epoch_length=4, log_every=2, checkpoint_every=4,
                            num_workers=0)
        config.optim.update(epochs=2, warmup_epochs=1, freeze_last_layer_epochs=1)
        config.teacher.update(teacher_temp=0.07, warmup_teacher_temp_epochs=1)
        config.evaluation.update(knn_train="", knn_val="")
    elif arg in ("distill", "small"):
        # A smaller student (64 wide, 2 heads: 0.21M backbone parameters, the demo's 0.47M)
        # for DISTILL_STEPS steps: distilled from a demo run, or trained from scratch.
        config.student.update(embed_dim=64, num_heads=2)
        epochs = DISTILL_STEPS // config.train.epoch_length
        config.optim.update(epochs=epochs, freeze_last_layer_epochs=epochs)
        if arg == "distill":
            config.student.drop_path_rate = 0.0
            config.train.centering = "sinkhorn_knopp"
            config.teacher.update(momentum_teacher=0.99, final_momentum_teacher=0.99)
            config.distillation.teacher = config_dict.placeholder(str)
    elif arg == "natural":
        config.train.dataset = "natural:train"
        config.crops.color_jitter = configs.default_config().crops.color_jitter
        config.evaluation.update(knn_train="natural:train", knn_val="natural:val")
    elif arg == "highres":
        configs.require_init_from(config)
        config.crops.update(global_crops_size=64, local_crops_size=32)
        config.train.epoch_length = 50
        config.optim.update(epochs=4, warmup_epochs=1, freeze_last_layer_epochs=4)
    elif arg == "v3":
        # DINOv3's architecture and Gram anchoring on the same data (see the docstring)
        config.student.update(pos_embed="rope", num_register_tokens=4)
        config.dino.loss_form = "dinov3"
        config.gram.update(use_loss=True, it_load_ema_teacher=750, rep_update=False,
                           loss_weight=1.0, img_level=True)
    elif arg:
        raise ValueError("configs/demo.py takes no arg, 'tiny', 'natural', 'highres', 'distill', "
                         f"'small' or 'v3', got {arg!r}")
    return config
