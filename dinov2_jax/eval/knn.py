"""Weighted k-NN classification on frozen features, the reference protocol (`dinov2/eval/knn.py`).

Features are L2-normalised cls tokens. For each query: cosine similarity to every train
feature, keep the top max(ks) (200), weights = softmax(similarity / T) over those with
T = 0.07, class score for k = sum over the first k neighbours of weight * onehot(label),
accuracy top-1 and top-5 (micro-averaged, in percent) for every k.

Ties break toward the lower index, both among neighbours (the lower train index first) and
among class scores (the lower class first), as `jax.lax.top_k` does.

Everything runs on device, one chunk of queries at a time against the train set in chunks
with a running top-k merge, so no (queries x train) matrix larger than one chunk pair exists.

  python -m dinov2_jax.eval.knn --weights W [--arch A] --train SRC --val SRC [--output F]

SRC is a data source string: demo:train, folder:/path, tfds:NAME:SPLIT, arrayrecord:GLOB.
The protocol is in docs/reference.md, Evaluation.
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from absl import flags

from dinov2_jax import cli
from dinov2_jax.eval import cli_flags, extract

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x, eps=1e-12):
    """x / max(||x||, eps) along the last axis, as torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def top_k_neighbors(database_chunks, database_valid, queries, k):
    """Top-k cosine similarities of `queries` (Q, D) to a chunked database.

    database_chunks (C, S, D) and database_valid (C, S) hold the database split in C chunks
    of S rows (invalid rows are padding). All inputs L2-normalised. Returns (Q, k) similarities
    (descending) and (Q, k) int32 database indices (row = chunk * S + position).
    """
    chunk_rows = database_chunks.shape[1]
    init = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
            jnp.zeros((queries.shape[0], k), jnp.int32))

    def merge(carry, chunk):
        best_sims, best_index = carry
        features, valid, offset = chunk
        sims = jnp.dot(queries, features.T, precision=_HIGHEST)
        sims = jnp.where(valid[None], sims, -jnp.inf)
        chunk_sims, chunk_index = jax.lax.top_k(sims, min(k, chunk_rows))
        # Earlier (lower-index) candidates first, so ties keep the lower index.
        sims = jnp.concatenate([best_sims, chunk_sims], axis=1)
        index = jnp.concatenate([best_index, chunk_index + offset], axis=1)
        best_sims, position = jax.lax.top_k(sims, k)
        return (best_sims, jnp.take_along_axis(index, position, axis=1)), None

    offsets = jnp.arange(database_chunks.shape[0], dtype=jnp.int32) * chunk_rows
    (sims, index), _ = jax.lax.scan(merge, init, (database_chunks, database_valid, offsets))
    return sims, index


def class_scores(neighbor_sims, neighbor_labels, k, num_classes, temperature):
    """(Q, num_classes) scores: softmax(sims / T) over all neighbours, summed per class over
    the first k."""
    weights = jax.nn.softmax(neighbor_sims / temperature, axis=1)
    rows = jnp.arange(neighbor_sims.shape[0])[:, None]
    return jnp.zeros((neighbor_sims.shape[0], num_classes), jnp.float32).at[
        rows, neighbor_labels[:, :k]].add(weights[:, :k])


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _knn_correct(database_chunks, database_valid, database_labels, queries, query_labels,
                 query_valid, temperature, *, ks, num_classes):
    """(len(ks), 2) int32: correct top-1 and top-5 predictions of one query chunk."""
    sims, index = top_k_neighbors(database_chunks, database_valid, l2_normalize(queries),
                                  max(ks))
    labels = database_labels[index]
    counts = []
    for k in ks:
        _, top = jax.lax.top_k(class_scores(sims, labels, k, num_classes, temperature),
                               min(5, num_classes))
        hits = top == query_labels[:, None]
        counts.append([jnp.sum(hits[:, 0] & query_valid), jnp.sum(hits.any(1) & query_valid)])
    return jnp.asarray(counts, jnp.int32)


def chunk_database(features, chunk_size):
    """(N, D) L2-normalised features -> ((C, S, D) chunks, (C, S) valid) on device."""
    features = l2_normalize(jnp.asarray(features, jnp.float32))
    rows = min(chunk_size, features.shape[0])
    chunks = -(-features.shape[0] // rows)
    pad = chunks * rows - features.shape[0]
    valid = jnp.arange(chunks * rows) < features.shape[0]
    features = jnp.pad(features, ((0, pad), (0, 0)))
    return features.reshape(chunks, rows, -1), valid.reshape(chunks, rows)


_top_k_neighbors = jax.jit(lambda chunks, valid, queries, k: top_k_neighbors(
    chunks, valid, l2_normalize(queries), k), static_argnums=3)


def nearest_neighbors(database_features, query_features, k, *, chunk_size=256,
                      database_chunk_size=65536):
    """(Q, k) cosine similarities (descending) and (Q, k) database indices of the k nearest
    database rows of every query, as numpy; features need not be normalised."""
    database_features = np.asarray(database_features, np.float32)
    if not 1 <= k <= len(database_features):
        raise ValueError(f"k={k} must be in [1, {len(database_features)}] (the database size)")
    chunks, valid = chunk_database(database_features, database_chunk_size)
    sims, index = [], []
    for start in range(0, len(query_features), chunk_size):
        queries = np.asarray(query_features[start:start + chunk_size], np.float32)
        padded = np.pad(queries, ((0, chunk_size - len(queries)), (0, 0)))
        chunk_sims, chunk_index = _top_k_neighbors(chunks, valid, padded, k)
        sims.append(np.asarray(chunk_sims)[:len(queries)])
        index.append(np.asarray(chunk_index)[:len(queries)])
    return np.concatenate(sims), np.concatenate(index)


def _check_labels(labels, what):
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{what} labels must be 1-D, got shape {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{what}: {int((labels < 0).sum())} of {len(labels)} images have no "
                         "label (-1); k-NN needs labelled images (e.g. one sub-folder per class)")
    return labels.astype(np.int32)


def knn_classify(train_features, train_labels, query_features, query_labels, *, ks=KS,
                 temperature=TEMPERATURE, num_classes=None, chunk_size=256,
                 train_chunk_size=65536, progress=False):
    """k-NN accuracy of `query_features` against `train_features` (the module's protocol).

    Features (N, D) need not be normalised (they are L2-normalised here); labels are ints
    >= 0; num_classes defaults to the largest label + 1. Returns percentages:
    {"knn/top1_k10", "knn/top5_k10", ... for every k, "knn/top1": the best top-1 over k}.
    """
    ks = tuple(int(k) for k in ks)
    train_labels = _check_labels(train_labels, "train")
    query_labels = _check_labels(query_labels, "query")
    train_features, query_features = np.asarray(train_features), np.asarray(query_features)
    if train_features.shape[0] != len(train_labels) or query_features.shape[0] != len(query_labels):
        raise ValueError(f"features and labels disagree: train {train_features.shape} vs "
                         f"{len(train_labels)} labels, query {query_features.shape} vs "
                         f"{len(query_labels)} labels")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"train features are {train_features.shape[1]}-d, queries "
                         f"{query_features.shape[1]}-d")
    if not ks or min(ks) < 1 or max(ks) > len(train_labels):
        raise ValueError(f"ks={ks} must be in [1, {len(train_labels)}] (the train set size)")
    if not len(query_labels):
        raise ValueError("no query images to classify")
    num_classes = num_classes or int(max(train_labels.max(), query_labels.max())) + 1
    database, valid = chunk_database(train_features, train_chunk_size)
    database_labels = jnp.pad(jnp.asarray(train_labels),
                              (0, database.shape[0] * database.shape[1] - len(train_labels)))
    correct = np.zeros((len(ks), 2), np.int64)
    for start in tqdm.trange(0, len(query_labels), chunk_size, desc="k-NN", file=sys.stderr,
                             disable=not progress or jax.process_index() != 0):
        queries = query_features[start:start + chunk_size]
        count = len(queries)
        pad = chunk_size - count
        correct += np.asarray(_knn_correct(
            database, valid, database_labels,
            np.pad(queries.astype(np.float32), ((0, pad), (0, 0))),
            np.pad(query_labels[start:start + count], (0, pad)),
            np.arange(chunk_size) < count, np.float32(temperature),
            ks=ks, num_classes=num_classes))
    accuracy = 100.0 * correct / len(query_labels)
    results = {}
    for k, (top1, top5) in zip(ks, accuracy):
        results[f"knn/top1_k{k}"] = float(top1)
        results[f"knn/top5_k{k}"] = float(top5)
    results["knn/top1"] = float(accuracy[:, 0].max())
    return results


def knn_eval(model, params, train_source, val_source, *, image_size, resize_size,
             batch_size=256, ks=KS, temperature=TEMPERATURE, dtype=jnp.float32, num_workers=0,
             progress=True):
    """k-NN accuracy of a backbone: cls features of both sources through the eval transform,
    then `knn_classify`. `model`/`params` are a DinoVisionTransformer and its backbone params;
    sources are source strings or opened sources; `batch_size` is the global batch."""
    common = dict(features=("cls",), image_size=image_size, resize_size=resize_size,
                  batch_size=batch_size, dtype=dtype, num_workers=num_workers, progress=progress)
    train = extract.extract_source(model, params, train_source, desc="k-NN train", **common)
    val = extract.extract_source(model, params, val_source, desc="k-NN val", **common)
    return knn_classify(train["cls"], train["label"], val["cls"], val["label"], ks=ks,
                        temperature=temperature, progress=progress)


def _define(flag_values):
    cli_flags.define_eval_flags(flag_values)
    cli_flags.define_source_flags(flag_values, train="labelled source of the neighbours",
                                  val="labelled source of the queries")
    flags.DEFINE_string("ks", ",".join(map(str, KS)), "comma-separated k values",
                        flag_values=flag_values)
    flags.DEFINE_float("temperature", TEMPERATURE, "softmax temperature of the neighbour "
                       "weights", flag_values=flag_values)


def main(argv=None):
    args = cli.parse(argv, _define, "Weighted k-NN accuracy of a backbone (the DINOv2 protocol).")
    model, params = cli_flags.load_model(args)
    results = knn_eval(model, params, args.train, args.val, image_size=args.size,
                       resize_size=args.resize_size or extract.default_resize_size(args.size),
                       batch_size=args.batch_size, ks=cli_flags.number_list(args, "ks"),
                       temperature=args.temperature, dtype=args.dtype,
                       num_workers=args.num_workers)
    cli_flags.report(results, args, train=args.train, val=args.val,
                     temperature=args.temperature)


if __name__ == "__main__":
    cli.run(main)
