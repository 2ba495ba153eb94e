"""Revisited Oxford and Paris instance retrieval (Radenovic et al. 2018), the DINOv2 paper's
retrieval protocol, on a backbone's cls features.

A dataset is named `roxford5k:ROOT` or `rparis6k:ROOT`, ROOT holding the standard
`gnd_roxford5k.pkl` / `gnd_rparis6k.pkl` and `jpg/NAME.jpg`. The ground-truth file is
{"imlist": database names, "qimlist": query names, "gnd": per query {"bbx": [x1, y1, x2, y2],
"easy": [...], "hard": [...], "junk": [...]} (database indices)}. Each query image is cropped
to its box before its features are extracted.

Every query ranks the whole database by cosine similarity (descending; ties toward the lower
index). The three settings (revisitop's `compute_map`):
  easy    positives easy,         ignored junk + hard
  medium  positives easy + hard,  ignored junk
  hard    positives hard,         ignored junk + easy
Ignored images leave the ranking. With r the 0-based rank of the j-th positive (0-based)
among the images not ignored, AP = sum over positives of (p0 + p1) / 2 / npos, with
p0 = j / r (1 when r = 0) and p1 = (j + 1) / (r + 1), revisitop's trapezoidal rule. mP@k:
positives in the first min(k, rank of the last positive) images, divided by that count.
mAP and mP@k average over the queries with a positive, in percent. A database image that
cannot be read leaves the ranking (counted); a query that cannot be read is not scored.

  python -m dinov2_jax.eval.revisited --weights W --dataset roxford5k:ROOT [--size 224]
"""
import dataclasses
import functools
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath

from dinov2_jax import cli
from dinov2_jax.configs import ConfigError
from dinov2_jax.data import sources
from dinov2_jax.eval import cli_flags, dense, extract

DATASETS = ("roxford5k", "rparis6k")
SETTINGS = ("easy", "medium", "hard")
KS = (1, 5, 10)
POSITIVE, JUNK = 1, 2  # relevance codes; 0 is a negative


def relevance(ground_truth, num_database, setting):
    """(Q, N) int8 codes of one setting: POSITIVE, JUNK (ignored) or 0 per database image."""
    codes = np.zeros((len(ground_truth), num_database), np.int8)
    for row, query in enumerate(ground_truth):
        easy, hard = list(query.get("easy", ())), list(query.get("hard", ()))
        junk = list(query.get("junk", ()))
        positives, ignored = {"easy": (easy, junk + hard), "medium": (easy + hard, junk),
                              "hard": (hard, junk + easy)}[setting]
        codes[row, np.asarray(ignored, np.int64)] = JUNK
        codes[row, np.asarray(positives, np.int64)] = POSITIVE
    return codes


@functools.partial(jax.jit, static_argnames=("ks",))
def query_scores(database, queries, codes, *, ks=KS):
    """AP (Q,), precision at each k (Q, len(ks)) and has-a-positive (Q,) of L2-normalised
    query features against the database, under relevance `codes` (Q, N)."""
    sims = jnp.dot(queries, database.T, precision=jax.lax.Precision.HIGHEST)
    order = jnp.argsort(-sims, axis=1, stable=True)
    ranked = jnp.take_along_axis(codes, order, axis=1)
    positive, junk = ranked == POSITIVE, ranked == JUNK
    junk_before = jnp.cumsum(junk, axis=1) - junk
    rank = jnp.arange(codes.shape[1])[None, :] - junk_before  # among the non-ignored
    index = jnp.cumsum(positive, axis=1) - 1  # j: position among the positives
    p0 = jnp.where(rank == 0, 1.0, index / jnp.maximum(rank, 1))
    p1 = (index + 1) / (rank + 1)
    num_positive = jnp.sum(positive, axis=1)
    ap = jnp.sum(jnp.where(positive, (p0 + p1) / 2, 0.0), axis=1) / jnp.maximum(num_positive, 1)
    last = jnp.max(jnp.where(positive, rank + 1, 0), axis=1)
    precisions = []
    for k in ks:
        cutoff = jnp.minimum(last, k)
        hits = jnp.sum(positive & (rank + 1 <= cutoff[:, None]), axis=1)
        precisions.append(hits / jnp.maximum(cutoff, 1))
    return ap, jnp.stack(precisions, axis=1), num_positive > 0


def l2_normalize(x):
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def revisited_metrics(database_features, query_features, ground_truth, *, ks=KS,
                      chunk_size=256, prefix="revisited"):
    """{"revisited/mAP_easy", ".../mAP_medium", ".../mAP_hard", ".../mP@k_<setting>", ...}
    in percent. Rows of NaN features (unreadable images) leave the ranking / are skipped."""
    database_features = np.asarray(database_features, np.float32)
    query_features = np.asarray(query_features, np.float32)
    if len(ground_truth) != len(query_features):
        raise ConfigError(f"{len(ground_truth)} ground-truth entries for "
                          f"{len(query_features)} queries")
    missing_database = np.isnan(database_features).any(axis=1)
    readable_queries = ~np.isnan(query_features).any(axis=1)
    database = l2_normalize(np.nan_to_num(database_features))
    results = {}
    for setting in SETTINGS:
        codes = relevance(ground_truth, len(database_features), setting)
        codes[:, missing_database] = JUNK
        ap_sum, precision_sum, scored = 0.0, np.zeros(len(ks)), 0
        for start in range(0, len(query_features), chunk_size):
            rows = slice(start, start + chunk_size)
            ap, precision, has_positive = jax.tree.map(np.asarray, query_scores(
                database, l2_normalize(np.nan_to_num(query_features[rows])),
                jnp.asarray(codes[rows]), ks=tuple(ks)))
            keep = has_positive & readable_queries[rows]
            ap_sum += float(ap[keep].sum())
            precision_sum += precision[keep].sum(axis=0)
            scored += int(keep.sum())
        results[f"{prefix}/mAP_{setting}"] = 100.0 * ap_sum / max(scored, 1)
        for k, value in zip(ks, precision_sum):
            results[f"{prefix}/mP@{k}_{setting}"] = 100.0 * float(value) / max(scored, 1)
        results[f"{prefix}/queries_{setting}"] = float(scored)
    results[f"{prefix}/unreadable_database"] = float(missing_database.sum())
    results[f"{prefix}/unreadable_queries"] = float((~readable_queries).sum())
    return results


# ------------------------------------------------------------------------------------------
# The datasets.


@dataclasses.dataclass
class RevisitedImages:
    """Random-access image records of the database or (cropped to their boxes) the queries."""
    paths: list
    boxes: list | None = None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        record = {"label": sources.UNKNOWN_LABEL, "key": str(path)}
        try:
            data = epath.Path(path).read_bytes()
        except OSError as error:
            return {**record, "image": b"", "error": f"{path}: {error}"}
        if self.boxes is None:
            return {**record, "image": data}
        try:
            image = sources.decode_image(data)
        except sources.BadRecordError as error:
            return {**record, "image": b"", "error": f"{path}: {error}"}
        x1, y1, x2, y2 = (int(round(float(v))) for v in self.boxes[index])
        crop = image[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)]
        if crop.size == 0:
            return {**record, "image": b"", "error": f"{path}: empty query box {self.boxes[index]}"}
        return {**record, "image": np.ascontiguousarray(crop)}


@dataclasses.dataclass
class RevisitedDataset:
    name: str
    database: RevisitedImages
    queries: RevisitedImages
    ground_truth: list


def open_revisited(spec):
    """The dataset named `roxford5k:ROOT` or `rparis6k:ROOT`."""
    kind, _, root_text = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind not in DATASETS or not root_text:
        raise ConfigError(f"dataset {spec!r}: expected roxford5k:ROOT or rparis6k:ROOT")
    root = epath.Path(root_text)
    gnd_path = root / f"gnd_{kind}.pkl"
    if not gnd_path.exists():
        raise ConfigError(f"dataset {spec!r}: {gnd_path} does not exist")
    try:
        gnd = pickle.loads(gnd_path.read_bytes())
        imlist, qimlist, entries = gnd["imlist"], gnd["qimlist"], gnd["gnd"]
    except (KeyError, TypeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"{gnd_path}: not a revisited ground-truth file "
                          f"({type(error).__name__}: {error})") from error
    if len(entries) != len(qimlist):
        raise ConfigError(f"{gnd_path}: {len(entries)} 'gnd' entries for {len(qimlist)} queries")
    for row, entry in enumerate(entries):
        for key in ("easy", "hard", "junk"):
            bad = [i for i in entry.get(key, ()) if not 0 <= int(i) < len(imlist)]
            if bad:
                raise ConfigError(f"{gnd_path}: query {row} ({qimlist[row]}) lists {key} "
                                  f"images {bad[:5]} outside the {len(imlist)}-image database")
        if len(entry.get("bbx", ())) != 4:
            raise ConfigError(f"{gnd_path}: query {row} ({qimlist[row]}) has no 4-value 'bbx'")
    jpg = root / "jpg"
    return RevisitedDataset(spec, RevisitedImages([jpg / f"{name}.jpg" for name in imlist]),
                            RevisitedImages([jpg / f"{name}.jpg" for name in qimlist],
                                            [entry["bbx"] for entry in entries]),
                            list(entries))


def _features_by_position(extracted, count):
    """(count, D) cls features in source order, NaN rows for skipped records."""
    features = np.full((count, extracted["cls"].shape[1]), np.nan, np.float32)
    features[extracted["index"]] = extracted["cls"]
    return features


def revisited_eval(model, params, dataset, *, image_size=224, resize_size=None, batch_size=64,
                   dtype=None, num_workers=0, progress=True):
    """Revisited mAP (easy, medium, hard) and mP@k of a backbone's cls features."""
    dataset = open_revisited(dataset) if isinstance(dataset, str) else dataset
    common = dict(features=("cls",), image_size=image_size,
                  resize_size=image_size if resize_size is None else resize_size,
                  batch_size=batch_size, dtype=dtype, num_workers=num_workers, progress=progress)
    database = extract.extract_source(model, params, dataset.database, desc="database", **common)
    queries = extract.extract_source(model, params, dataset.queries, desc="queries", **common)
    return revisited_metrics(_features_by_position(database, len(dataset.database)),
                             _features_by_position(queries, len(dataset.queries)),
                             dataset.ground_truth)


def _define(flag_values):
    cli_flags.define_model_flags(flag_values, size=224, batch_size=64)
    flags.DEFINE_string("dataset", None, "roxford5k:ROOT or rparis6k:ROOT", required=True,
                        flag_values=flag_values)
    flags.DEFINE_integer("resize_size", None, "short side before the center crop (default "
                         "--size: the crop keeps the whole short side)", flag_values=flag_values)
    flags.DEFINE_string("output", None, "results JSON file", flag_values=flag_values)


def main(argv=None):
    args = cli.parse(argv, _define, "Revisited Oxford/Paris retrieval of a backbone's cls "
                     "features.")
    model, params = cli_flags.load_model(args)
    results = revisited_eval(model, params, args.dataset, image_size=args.size,
                             resize_size=args.resize_size, batch_size=args.batch_size,
                             dtype=jnp.dtype(args.dtype), num_workers=args.num_workers)
    dense.report(results, args, "revisited", dataset=args.dataset)
    print(f"{args.dataset}: mAP medium {results['revisited/mAP_medium']:.2f}, hard "
          f"{results['revisited/mAP_hard']:.2f}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
