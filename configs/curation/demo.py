"""Curation recipe on the demo data: embed, dedup against the held-out split, cluster, sample.

The pool is the demo's train split (2,000 images), the evaluation set its val split. Stages,
all under --workdir (a rerun resumes: embed and kmeans by shard and level, the others are
skipped when their output exists):

  embeddings/   against-0/   keep.npy   clusters/   selection.npy   curated/*.array_record

    python -m dinov2_jax.main --config=configs/demo.py --workdir=/tmp/demo_teacher
    python -m dinov2_jax.curate recipe --config=configs/curation/demo.py \\
        --workdir=/tmp/demo_curation --config.weights=/tmp/demo_teacher
    python -m dinov2_jax.main --config=configs/demo.py --workdir=/tmp/demo_curated \\
        --config.train.dataset='arrayrecord:/tmp/demo_curation/curated/*.array_record'

`--config=configs/curation/demo.py:tiny` is a smaller pool (400 images) for tests.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.weights = ""   # weights dir or training workdir of the embedding model (required)
    c.arch = ""      # only for torch weight files
    c.images = "demo:train"
    c.against_images = ("demo:val",)
    c.seed = 0
    c.memory_budget_mb = 256
    # The demo model sees 40 px crops in training; 56 px (from 64 px images) keeps detail.
    c.embed = dict(image_size=56, batch_size=250, shard_size=500, features="cls")
    # Cosine thresholds: near-copies within the pool, and pool images too close to an
    # evaluation image (the DINOv2 paper's "relative" dedup). They depend on the model: the
    # demo's small teachers put images close together (nearest-neighbour cosine 0.99 at the
    # median after a short run), so only near-identical images pass these.
    c.dedup = dict(threshold=0.9995, against_threshold=0.999, k=16)
    c.kmeans = dict(levels=(50, 10), iterations=10, resampling=(1, 1), resampling_size=(5, 3),
                    init="kmeans++")
    c.sample = dict(size=1000, strategy="closest")
    if arg == "tiny":
        c.images = "demo:train:num_images=400"
        c.against_images = ("demo:val:num_images=100",)
        c.embed.update(batch_size=100, shard_size=200)
        c.kmeans.update(levels=(20, 5), iterations=5)
        c.sample.size = 160
    elif arg:
        raise ValueError(f"configs/curation/demo.py takes no arg or 'tiny', got {arg!r}")
    return c
