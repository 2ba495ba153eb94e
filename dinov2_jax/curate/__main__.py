"""Command line: `python -m dinov2_jax.curate COMMAND --flag=value ...` (COMMAND --help lists).

  embed       --weights W [--arch A] --images SRC --output DIR
  dedup       --embeddings E --threshold T [--against E2 ...] --output keep.npy
  retrieve    --embeddings E --queries Q --k K --output sel.npy
              (or --per_cluster M --clusters DIR instead of --k)
  kmeans      --embeddings E [--indices keep.npy] --levels 100000,10000,1000 --iterations N
              [--resampling R] --output DIR
  sample      --clusters DIR --size N [--strategy random|closest] --output sel.npy
  materialize --source SRC --indices sel.npy [--embeddings E] --output DIR
  recipe      --config=configs/curation/demo.py --workdir=DIR   (all of them, in order)

Embeddings (E) are an (N, D) `.npy` file or a folder of shards (what `embed` writes); every
index file is a `.npy` int64 vector of rows into E. Every command that reads embeddings
streams them in chunks within --memory_budget_mb.
"""
import functools
import sys

from absl import flags
from etils import epath
from ml_collections import config_flags

from dinov2_jax import cli
from dinov2_jax.configs import ConfigError
from dinov2_jax.curate import dedup, embed, kmeans, materialize, retrieve, sample
from dinov2_jax.curate import embeddings as emb


def _budget(fv):
    flags.DEFINE_float("memory_budget_mb", emb.DEFAULT_MEMORY_BUDGET_MB,
                       "host memory for embedding chunks and their score matrices", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show progress bars", flag_values=fv)


def _define_embed(fv):
    flags.DEFINE_string("weights", None, "dinov2_jax weights dir, training workdir, or torch "
                        ".pth/.safetensors", flag_values=fv, required=True)
    flags.DEFINE_string("arch", None, "hub name or size (vitl14, vit_large); torch files only",
                        flag_values=fv)
    flags.DEFINE_enum("network", "teacher", ("teacher", "student"), "network of a workdir",
                      flag_values=fv)
    flags.DEFINE_string("images", None, "image source string (folder:, arrayrecord:, tfds:, "
                        "demo)", flag_values=fv, required=True)
    flags.DEFINE_string("output", None, "output folder", flag_values=fv, required=True)
    flags.DEFINE_enum("features", "cls", embed.FEATURES, "cls token, or cls + mean patch token",
                      flag_values=fv)
    flags.DEFINE_integer("image_size", 224, "center-crop size", flag_values=fv)
    flags.DEFINE_integer("resize_size", None, "short side before the crop (default "
                         "image_size*256/224)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "global images per forward", flag_values=fv)
    flags.DEFINE_integer("shard_size", embed.DEFAULT_SHARD_SIZE, "images per output shard",
                         flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "backbone compute dtype",
                      flag_values=fv)
    flags.DEFINE_integer("num_workers", 0, "image decoding processes", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show progress bars", flag_values=fv)


def _run_embed(f):
    embed.embed(f.weights, f.images, f.output, arch=f.arch, network=f.network,
                features=f.features, image_size=f.image_size, resize_size=f.resize_size,
                batch_size=f.batch_size, shard_size=f.shard_size, dtype=f.dtype,
                num_workers=f.num_workers, progress=f.progress)


def _define_dedup(fv):
    flags.DEFINE_string("embeddings", None, "pool embeddings", flag_values=fv, required=True)
    flags.DEFINE_float("threshold", None, "cosine similarity from which two pool images are "
                       "duplicates", flag_values=fv, required=True)
    flags.DEFINE_multi_string("against", [], "embeddings of an evaluation set: pool images "
                              "near one of them are dropped (repeatable)", flag_values=fv)
    flags.DEFINE_float("against_threshold", None, "cosine threshold for --against (default "
                       "--threshold)", flag_values=fv)
    flags.DEFINE_integer("k", dedup.DEFAULT_K, "neighbours per image in the duplicate graph",
                         flag_values=fv)
    flags.DEFINE_string("output", None, "kept rows, .npy", flag_values=fv, required=True)
    _budget(fv)


def _run_dedup(f):
    keep, stats = dedup.dedup(emb.Embeddings.open(f.embeddings), f.threshold,
                              [emb.Embeddings.open(path) for path in f.against],
                              against_threshold=f.against_threshold, k=f.k,
                              memory_budget_mb=f.memory_budget_mb, progress=f.progress)
    emb.save_array(f.output, keep)
    print(f"kept {stats['kept']} of {stats['pool']} ({stats['dropped_within']} near-duplicates "
          f"within the pool, {stats['dropped_against']} near the --against sets): {f.output}")


def _define_retrieve(fv):
    flags.DEFINE_string("embeddings", None, "pool embeddings", flag_values=fv, required=True)
    flags.DEFINE_string("queries", None, "seed embeddings", flag_values=fv, required=True)
    flags.DEFINE_integer("k", None, "nearest pool images per seed", flag_values=fv)
    flags.DEFINE_integer("per_cluster", None, "instead of --k: random pool images from each "
                         "seed's nearest level-1 cluster of --clusters", flag_values=fv)
    flags.DEFINE_string("clusters", None, "`kmeans` output of the pool (with --per_cluster)",
                        flag_values=fv)
    flags.DEFINE_integer("seed", 0, "random seed (with --per_cluster)", flag_values=fv)
    flags.DEFINE_string("output", None, "selected rows, .npy", flag_values=fv, required=True)
    _budget(fv)


def _run_retrieve(f):
    pool, queries = emb.Embeddings.open(f.embeddings), emb.Embeddings.open(f.queries)
    if (f.k is None) == (f.per_cluster is None):
        raise ConfigError("give exactly one of --k and --per_cluster")
    if f.per_cluster is not None:
        if not f.clusters:
            raise ConfigError("--per_cluster needs --clusters (a `kmeans` output of the pool)")
        if queries.dim != pool.dim:
            raise ConfigError(f"--queries have dimension {queries.dim}, the pool {pool.dim}")
        selected = retrieve.retrieve_per_cluster(queries, f.clusters, f.per_cluster, seed=f.seed,
                                                 memory_budget_mb=f.memory_budget_mb,
                                                 progress=f.progress)
    else:
        selected = retrieve.retrieve(pool, queries, f.k, memory_budget_mb=f.memory_budget_mb,
                                     progress=f.progress)
    emb.save_array(f.output, selected)
    print(f"selected {len(selected)} of {len(pool)} pool images for {len(queries)} seeds: "
          f"{f.output}")


def _define_kmeans(fv):
    flags.DEFINE_string("embeddings", None, "embeddings to cluster", flag_values=fv,
                        required=True)
    flags.DEFINE_string("indices", None, "only these rows of --embeddings (e.g. dedup's "
                        "keep.npy)", flag_values=fv)
    flags.DEFINE_list("levels", None, "clusters per level, finest first, e.g. "
                      "100000,10000,1000", flag_values=fv, required=True)
    flags.DEFINE_integer("iterations", kmeans.DEFAULT_ITERATIONS, "Lloyd iterations per run",
                         flag_values=fv)
    flags.DEFINE_list("resampling", ["0"], "resampling steps, one value or one per level",
                      flag_values=fv)
    flags.DEFINE_list("resampling_size", [str(kmeans.DEFAULT_RESAMPLING_SIZE)],
                      "points per cluster in a resample, one value or one per level",
                      flag_values=fv)
    flags.DEFINE_enum("resampling_strategy", "closest", kmeans.RESAMPLING_STRATEGIES,
                      "which members make a resample", flag_values=fv)
    flags.DEFINE_enum("init", "kmeans++", kmeans.INITS, "initial centroids", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)
    flags.DEFINE_string("output", None, "output folder (a rerun resumes it)", flag_values=fv,
                        required=True)
    _budget(fv)


def _ints(values, name):
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ConfigError(f"--{name} takes comma-separated integers, got {values}") from None


def _run_kmeans(f):
    embeddings = emb.Embeddings.open(f.embeddings)
    indices = None if f.indices is None else emb.load_indices(f.indices, len(embeddings))
    kmeans.hierarchical_kmeans(
        embeddings, _ints(f.levels, "levels"), f.iterations, f.output, indices=indices,
        indices_name=f.indices or "", resampling=_ints(f.resampling, "resampling"),
        resampling_size=_ints(f.resampling_size, "resampling_size"),
        resampling_strategy=f.resampling_strategy, init=f.init, seed=f.seed,
        memory_budget_mb=f.memory_budget_mb, progress=f.progress)


def _define_sample(fv):
    flags.DEFINE_string("clusters", None, "`kmeans` output folder", flag_values=fv,
                        required=True)
    flags.DEFINE_integer("size", None, "images to select", flag_values=fv, required=True)
    flags.DEFINE_enum("strategy", "closest", sample.STRATEGIES, "which members of a level-1 "
                      "cluster give its share", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)
    flags.DEFINE_string("output", None, "selected rows, .npy", flag_values=fv, required=True)


def _run_sample(f):
    selected = sample.sample_clusters(f.clusters, f.size, strategy=f.strategy, seed=f.seed)
    emb.save_array(f.output, selected)
    print(f"selected {len(selected)} images: {f.output}")


def _define_materialize(fv):
    flags.DEFINE_string("source", None, "image source string the embeddings were made from",
                        flag_values=fv, required=True)
    flags.DEFINE_string("indices", None, "selected rows, .npy", flag_values=fv, required=True)
    flags.DEFINE_string("embeddings", None, "the `embed` output the rows index (maps rows to "
                        "source positions); without it rows are source positions",
                        flag_values=fv)
    flags.DEFINE_string("output", None, "output folder for the shards", flag_values=fv,
                        required=True)
    flags.DEFINE_integer("records_per_shard", materialize.prepare.RECORDS_PER_SHARD,
                         "records per ArrayRecord shard", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show progress bars", flag_values=fv)


def _run_materialize(f):
    embeddings = emb.Embeddings.open(f.embeddings) if f.embeddings else None
    rows = emb.load_indices(f.indices, len(embeddings) if embeddings else sys.maxsize)
    metadata = materialize.materialize(f.source, materialize.source_positions(rows, embeddings),
                                       f.output, records_per_shard=f.records_per_shard,
                                       selection_name=f.indices, progress=f.progress)
    print(f"wrote {metadata['num_records']} records in {len(metadata['shards'])} shards "
          f"({len(metadata['skipped'])} unreadable skipped); train with "
          f"--config.train.dataset='arrayrecord:{epath.Path(f.output) / '*.array_record'}'")


def _define_recipe(fv, argv=()):
    # `argv` lets config_flags find --config early and define its --config.key overrides.
    config_flags.DEFINE_config_file("config", None, "curation recipe, e.g. "
                                    "configs/curation/demo.py", flag_values=fv,
                                    sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "folder for every stage's output (a rerun resumes)",
                        flag_values=fv, required=True)


def _run_recipe(f):
    if f.config is None:
        raise ConfigError("--config is required (e.g. configs/curation/demo.py)")
    c, workdir = f.config, epath.Path(f.workdir)
    if not c.weights:
        raise ConfigError("--config.weights is required: the weights dir or training workdir "
                          "of the embedding model")
    stages = recipe_commands(c, workdir)
    for number, argv in enumerate(stages, 1):
        command_line = f"python -m dinov2_jax.curate {' '.join(argv)}"
        done = _DONE_MARKERS.get(argv[0])  # embed and kmeans resume by themselves.
        output = epath.Path(next(a for a in argv if a.startswith("--output=")).split("=", 1)[1])
        if done is not None and done(output).exists():
            print(f"[{number}/{len(stages)}] done already ({done(output)}): {command_line}")
            continue
        print(f"[{number}/{len(stages)}] {command_line}", flush=True)
        COMMANDS[argv[0]][1](cli.parse([f"curate {argv[0]}", *argv[1:]], COMMANDS[argv[0]][0]))


_DONE_MARKERS = {"dedup": lambda output: output, "sample": lambda output: output,
                 "materialize": lambda output: output / "metadata.json"}


def recipe_commands(c, workdir) -> list[list[str]]:
    """The command lines of a curation recipe config (see configs/curation/demo.py)."""
    workdir = epath.Path(workdir)
    budget = f"--memory_budget_mb={c.memory_budget_mb}"
    embed_flags = [f"--weights={c.weights}", f"--image_size={c.embed.image_size}",
                   f"--batch_size={c.embed.batch_size}", f"--shard_size={c.embed.shard_size}",
                   f"--features={c.embed.features}"] + ([f"--arch={c.arch}"] if c.arch else [])
    stages = [["embed", *embed_flags, f"--images={c.images}", f"--output={workdir / 'embeddings'}"]]
    against = []
    for number, images in enumerate(c.against_images):
        against.append(workdir / f"against-{number}")
        stages.append(["embed", *embed_flags, f"--images={images}", f"--output={against[-1]}"])
    stages.append(["dedup", f"--embeddings={workdir / 'embeddings'}",
                   f"--threshold={c.dedup.threshold}",
                   f"--against_threshold={c.dedup.against_threshold}", f"--k={c.dedup.k}",
                   *(f"--against={path}" for path in against), budget,
                   f"--output={workdir / 'keep.npy'}"])
    join = lambda values: ",".join(str(v) for v in values)
    stages.append(["kmeans", f"--embeddings={workdir / 'embeddings'}",
                   f"--indices={workdir / 'keep.npy'}", f"--levels={join(c.kmeans.levels)}",
                   f"--iterations={c.kmeans.iterations}",
                   f"--resampling={join(c.kmeans.resampling)}",
                   f"--resampling_size={join(c.kmeans.resampling_size)}",
                   f"--init={c.kmeans.init}", f"--seed={c.seed}", budget,
                   f"--output={workdir / 'clusters'}"])
    stages.append(["sample", f"--clusters={workdir / 'clusters'}", f"--size={c.sample.size}",
                   f"--strategy={c.sample.strategy}", f"--seed={c.seed}",
                   f"--output={workdir / 'selection.npy'}"])
    stages.append(["materialize", f"--source={c.images}", f"--indices={workdir / 'selection.npy'}",
                   f"--embeddings={workdir / 'embeddings'}", f"--output={workdir / 'curated'}"])
    return stages


COMMANDS = {
    "embed": (_define_embed, _run_embed, embed.__doc__),
    "dedup": (_define_dedup, _run_dedup, dedup.__doc__),
    "retrieve": (_define_retrieve, _run_retrieve, retrieve.__doc__),
    "kmeans": (_define_kmeans, _run_kmeans, kmeans.__doc__),
    "sample": (_define_sample, _run_sample, sample.__doc__),
    "materialize": (_define_materialize, _run_materialize, materialize.__doc__),
    "recipe": (_define_recipe, _run_recipe, "Runs a curation recipe's commands in order."),
}


def main(argv):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(__doc__)
        return
    command = argv[1]
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    define, run, description = COMMANDS[command]
    command_argv = [f"{argv[0]} {command}", *argv[2:]]
    if command == "recipe":
        define = functools.partial(_define_recipe, argv=command_argv)
    run(cli.parse(command_argv, define, description))


if __name__ == "__main__":
    cli.run(main)
