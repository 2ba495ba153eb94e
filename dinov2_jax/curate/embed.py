"""Embeddings of an image source, written shard by shard so that a rerun resumes.

Every image of the source goes through the backbone (jitted, inference mode, through the eval
transform of `dinov2_jax.eval.extract`: short side resized, center crop), sharded over hosts
and devices. The embedding is the L2-normalised cls token, or cls concatenated with the mean
patch token (`cls_patch_mean`). The output folder holds

  embeddings-00000.npy   (n, D) float32, rows of source images [0, shard_size), ...
  index-00000.npy        (n,) int64, the source position of each row (undecodable images are
                         skipped, so n may be less than shard_size)
  manifest.json          the settings and the complete shards, rewritten after each one

A shard is listed in the manifest only once both its files are on disk, so a rerun after a
kill resumes at the first shard not listed; a rerun with other settings is refused. The
folder is an `Embeddings` input for the other commands.
"""
import json
import math
import sys

import jax
import numpy as np
import tqdm
from etils import epath

from dinov2_jax import weights as weights_lib
from dinov2_jax.configs import ConfigError
from dinov2_jax.curate import embeddings as emb
from dinov2_jax.data import sources
from dinov2_jax.eval import extract

FEATURES = ("cls", "cls_patch_mean")
DEFAULT_SHARD_SIZE = 65536


class SourceSlice:
    """Records [start, stop) of a source, as a source."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        return self.source[self.start + index]


def shard_name(kind: str, shard: int) -> str:
    return f"{kind}-{shard:05d}.npy"


def embeddings_of(out: dict, features: str) -> np.ndarray:
    """The L2-normalised embedding rows of `extract` output."""
    parts = [out["cls"]] + ([out["patch_mean"]] if features == "cls_patch_mean" else [])
    rows = np.concatenate(parts, axis=1).astype(np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _manifest(output: epath.Path, settings: dict) -> dict:
    path = output / emb.MANIFEST
    if not path.exists():
        return {**settings, "shards": []}
    manifest = json.loads(path.read_text())
    changed = sorted(key for key in settings if manifest.get(key) != settings[key])
    if changed:
        raise ConfigError(f"{output} holds embeddings made with other settings ("
                          + ", ".join(f"{k}: {manifest.get(k)!r} there, {settings[k]!r} now"
                                      for k in changed) + "); use another --output")
    return manifest


def embed(weights: str, images: str, output, *, arch: str | None = None,
          network: str = "teacher", features: str = "cls", image_size: int = 224,
          resize_size: int | None = None, batch_size: int = 256,
          shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float32", num_workers: int = 0,
          progress: bool = True, log=print) -> dict:
    """Embeds every image of the source string `images` into `output`; returns the manifest."""
    if features not in FEATURES:
        raise ConfigError(f"--features {features!r} is not one of {FEATURES}")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"--shard_size and --batch_size must be >= 1, got {shard_size}, "
                          f"{batch_size}")
    if not epath.Path(weights).exists():
        raise ConfigError(f"--weights {weights} does not exist")
    model, params = weights_lib.load(weights, arch, network)
    if image_size % model.patch_size:
        raise ConfigError(f"--image_size {image_size} is not a multiple of the patch size "
                          f"{model.patch_size}")
    try:
        source = sources.open_source(images)
    except ValueError as e:
        raise ConfigError(f"--images: {e}") from None
    output = epath.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    resize_size = extract.default_resize_size(image_size) if resize_size is None else resize_size
    settings = {"images": images, "weights": str(weights), "network": network,
                "features": features, "image_size": image_size, "resize_size": resize_size,
                "shard_size": shard_size, "num_images": len(source), "dtype": dtype}
    manifest = _manifest(output, settings)
    num_shards = math.ceil(len(source) / shard_size)
    done = len(manifest["shards"])
    if done:
        log(f"{output}: {done} of {num_shards} shards complete, resuming at shard {done}")
    bar = tqdm.tqdm(total=len(source), initial=min(done * shard_size, len(source)), unit="img",
                    desc="embed", file=sys.stderr,
                    disable=not progress or jax.process_index() != 0)
    compute_dtype = None if dtype == "float32" else dtype
    for shard in range(done, num_shards):
        start, stop = shard * shard_size, min((shard + 1) * shard_size, len(source))
        out = extract.extract_source(
            model, params, SourceSlice(source, start, stop), features=("cls", "patch_mean"),
            image_size=image_size, resize_size=resize_size, batch_size=batch_size,
            dtype=compute_dtype, num_workers=num_workers, progress=False)
        rows, index = embeddings_of(out, features), out["index"] + start
        entry = {"embeddings": shard_name("embeddings", shard), "index": shard_name("index", shard),
                 "first_image": start, "rows": len(rows), "skipped": (stop - start) - len(rows)}
        manifest["shards"].append(entry)
        if jax.process_index() == 0:  # Every host holds every row; one writes.
            emb.save_array(output / entry["embeddings"], rows)
            emb.save_array(output / entry["index"], index)
            emb.save_json(output / emb.MANIFEST, manifest)
        bar.update(stop - start)
    bar.close()
    rows = sum(shard["rows"] for shard in manifest["shards"])
    skipped = sum(shard["skipped"] for shard in manifest["shards"])
    log(f"{output}: {rows} embeddings in {num_shards} shards, {skipped} undecodable images "
        f"skipped")
    return manifest
