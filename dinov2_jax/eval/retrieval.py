"""Instance retrieval from frozen features: mean average precision and recall@k.

Each query ranks the whole database by cosine similarity of L2-normalised features
(descending; ties toward the lower database index). A database item is relevant when it has
the query's label. For one query with relevant items at 1-based ranks r_1 < r_2 < ...:
  AP = mean over its relevant items i of (i / r_i)      (precision at each relevant item)
  recall@k = 1 if any relevant item is in the top k, else 0.
mAP and recall@k average over the queries that have at least one relevant item, in percent.
With `leave_one_out` the queries are the database itself and each query's own row is left
out of its ranking (the usual protocol when one labelled set is both).

Runs on device one chunk of queries at a time (a chunk x database similarity block).

  python -m dinov2_jax.eval.retrieval --weights W --database SRC [--queries SRC] [--ks 1,5,10]
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from absl import flags

from dinov2_jax import cli
from dinov2_jax.eval import cli_flags, extract, knn

KS = (1, 5, 10)


@functools.partial(jax.jit, static_argnames=("ks", "leave_one_out"))
def _query_scores(database, database_labels, queries, query_labels, query_rows, *, ks,
                  leave_one_out):
    """(Q,) average precision, (Q, len(ks)) hits at k, (Q,) has-a-relevant-item of a chunk."""
    sims = jnp.dot(knn.l2_normalize(queries), database.T, precision=jax.lax.Precision.HIGHEST)
    relevant = database_labels[None, :] == query_labels[:, None]
    if leave_one_out:
        own = jnp.arange(database.shape[0])[None, :] == query_rows[:, None]
        sims = jnp.where(own, -jnp.inf, sims)
        relevant = relevant & ~own
    order = jnp.argsort(-sims, axis=1, stable=True)
    ranked = jnp.take_along_axis(relevant, order, axis=1)
    hits = jnp.cumsum(ranked, axis=1)
    ranks = jnp.arange(1, database.shape[0] + 1)
    num_relevant = hits[:, -1]
    precision_sum = jnp.sum(jnp.where(ranked, hits / ranks, 0.0), axis=1)
    average_precision = precision_sum / jnp.maximum(num_relevant, 1)
    recall = jnp.stack([hits[:, k - 1] > 0 for k in ks], axis=1)
    return average_precision, recall, num_relevant > 0


def retrieval_metrics(database_features, database_labels, query_features=None,
                      query_labels=None, *, ks=KS, leave_one_out=None, chunk_size=256,
                      progress=False):
    """mAP and recall@k in percent: {"retrieval/mAP", "retrieval/recall@1", ...,
    "retrieval/queries": number of queries scored}.

    Without query features the database is its own query set, leave-one-out (the default
    then); ranks cover the whole database (minus the query's own row with leave_one_out).
    """
    if query_features is None:
        query_features, query_labels = database_features, database_labels
        leave_one_out = True if leave_one_out is None else leave_one_out
    leave_one_out = bool(leave_one_out)
    database_features = np.asarray(database_features, np.float32)
    query_features = np.asarray(query_features, np.float32)
    database_labels, query_labels = np.asarray(database_labels), np.asarray(query_labels)
    if leave_one_out and query_features.shape != database_features.shape:
        raise ValueError("leave_one_out needs the queries to be the database itself, got "
                         f"{query_features.shape} queries for {database_features.shape}")
    if len(database_labels) != len(database_features) or len(query_labels) != len(query_features):
        raise ValueError("features and labels disagree in length")
    if min(database_labels.min(initial=0), query_labels.min(initial=0)) < 0:
        raise ValueError("some images have no label (-1); retrieval needs labelled images")
    ks = tuple(int(k) for k in ks)
    size = len(database_labels) - leave_one_out
    if not ks or min(ks) < 1 or max(ks) > size:
        raise ValueError(f"ks={ks} must be in [1, {size}] (the ranked database size)")
    database = knn.l2_normalize(jnp.asarray(database_features))
    labels = jnp.asarray(database_labels, jnp.int32)
    ap_sum, recall_sum, scored = 0.0, np.zeros(len(ks)), 0
    for start in tqdm.trange(0, len(query_labels), chunk_size, desc="retrieval",
                             file=sys.stderr, disable=not progress or jax.process_index() != 0):
        count = min(chunk_size, len(query_labels) - start)
        pad = chunk_size - count
        average_precision, recall, has_relevant = jax.tree.map(np.asarray, _query_scores(
            database, labels, np.pad(query_features[start:start + count], ((0, pad), (0, 0))),
            np.pad(query_labels[start:start + count].astype(np.int32), (0, pad),
                   constant_values=-1),
            np.arange(start, start + chunk_size), ks=ks, leave_one_out=leave_one_out))
        keep = has_relevant & (np.arange(chunk_size) < count)
        ap_sum += float(average_precision[keep].sum())
        recall_sum += recall[keep].sum(axis=0)
        scored += int(keep.sum())
    if not scored:
        raise ValueError("no query has a relevant (same-label) item in the database")
    results = {"retrieval/mAP": 100.0 * ap_sum / scored}
    for k, value in zip(ks, recall_sum):
        results[f"retrieval/recall@{k}"] = 100.0 * float(value) / scored
    results["retrieval/queries"] = float(scored)
    return results


def retrieval_eval(model, params, database_source, query_source=None, *, image_size,
                   resize_size, batch_size=256, ks=KS, dtype=jnp.float32, num_workers=0,
                   progress=True):
    """Retrieval metrics of a backbone's cls features; without `query_source` (or with the
    database's own) the database is queried leave-one-out."""
    common = dict(features=("cls",), image_size=image_size, resize_size=resize_size,
                  batch_size=batch_size, dtype=dtype, num_workers=num_workers, progress=progress)
    database = extract.extract_source(model, params, database_source, desc="database", **common)
    if query_source is None or query_source == database_source:
        return retrieval_metrics(database["cls"], database["label"], ks=ks, progress=progress)
    queries = extract.extract_source(model, params, query_source, desc="queries", **common)
    return retrieval_metrics(database["cls"], database["label"], queries["cls"],
                             queries["label"], ks=ks, progress=progress)


def _define(flag_values):
    cli_flags.define_eval_flags(flag_values)
    cli_flags.define_source_flags(flag_values, database="labelled source to search in")
    flags.DEFINE_string("queries", None, "labelled query source (default: the database, "
                        "leave-one-out)", flag_values=flag_values)
    flags.DEFINE_string("ks", ",".join(map(str, KS)), "comma-separated k values",
                        flag_values=flag_values)


def main(argv=None):
    args = cli.parse(argv, _define, "Retrieval mAP and recall@k of a backbone's cls features.")
    model, params = cli_flags.load_model(args)
    results = retrieval_eval(
        model, params, args.database, args.queries, image_size=args.size,
        resize_size=args.resize_size or extract.default_resize_size(args.size),
        batch_size=args.batch_size, ks=cli_flags.number_list(args, "ks"),
        dtype=args.dtype, num_workers=args.num_workers)
    cli_flags.report(results, args, database=args.database, queries=args.queries)


if __name__ == "__main__":
    cli.run(main)
