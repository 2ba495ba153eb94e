"""High-resolution adaptation of a `vitl14` run: 10k iterations at 518 px global crops.

The DINOv2 paper (Sec. 4 and App. B.2) ends pretraining with "a short period" at 518 x 518:
the model starts from the pretrained weights and trains for 10k iterations with the same
procedure, its schedules compressed to the 10k iterations, and a reduced base learning rate;
the released position tables are 37 x 37 (518 / 14). The reference code has no such phase
(issues #211, #540), so the values it leaves open are chosen here, each with its reason:

- `train.init_from` (required): the pretraining workdir; student, teacher, heads and centers
  come from its newest checkpoint, position tables resampled 16 x 16 -> 37 x 37, AdamW and
  every schedule fresh (dinov2_jax/train/warm_start.py).
- crops: global 518 (the paper), local 224 (not given; pretraining's 98 / 224 ratio at 518
  px, rounded to the patch: 16 x 16 patches), 8 local crops and the pretraining scales.
- batch 2048: the paper gives none for this phase; DINOv3's high-resolution phase uses 2048
  (8 per GPU) for the same reason, 5.3x the tokens per image of 224 px.
- 10 epochs x 1,000 iterations. lr: base 5e-5 (peak 7.1e-5 after sqrt_wrt_1024 at 2048, the
  peak of DINOv3's high-resolution phase, 1.25e-5 before its x4 sqrt(B/1024) scaling), 1,000
  warm-up iterations (fresh AdamW moments) then cosine to 1e-6. Weight decay 0.04 -> 0.2 and
  teacher momentum 0.994 -> 1.0 over the 10k iterations (the pretraining schedules,
  compressed). Teacher temperature 0.07 throughout (where the pretraining warm-up ended: the
  teacher is trained) and no last-layer freeze (the prototypes are trained).

    python -m dinov2_jax.main --config=configs/vitl14_highres.py --workdir=gs://bucket/highres \
        --config.train.init_from=gs://bucket/vitl14 \
        --config.train.dataset=arrayrecord:/data/imagenet22k/*.array_record
    python -m dinov2_jax.main --config=configs/vitl14_highres.py:smoke --workdir=/tmp/hr \
        --config.train.init_from=/tmp/run   # CPU, from a configs/vitl14.py:smoke run
"""
from dinov2_jax import configs


def get_config(arg=None):
    config = configs.high_resolution_recipe("vit_large")
    if arg == "smoke":
        config = configs.smoke(config)
        config.crops.global_crops_size = 42  # the smoke run's 2 x 2 table resampled to 3 x 3
    return config
