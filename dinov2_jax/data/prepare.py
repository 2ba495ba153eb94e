"""Writes an image folder as ArrayRecord shards for the `arrayrecord:` source.

  python -m dinov2_jax.data.prepare --images DIR --output DIR [--shards N] [--threads N]

Every image under DIR (recursive; jpg/jpeg/png/webp/bmp) is read and decoded once to
validate it; valid files are stored with their original bytes, their label (the index of
their top-level sub-folder, sorted as torchvision's ImageFolder; -1 for files directly under
DIR) and their path relative to DIR. Files that cannot be read or decoded are skipped and
reported with the reason. Output:

  OUTPUT/images-00000-of-0000N.array_record ...   records in sources.encode_record format
  OUTPUT/metadata.json                            classes, counts, and every skipped file

Train on it with `--config.train.dataset='arrayrecord:OUTPUT/*.array_record'`.
"""
import argparse
import concurrent.futures
import json
import math
import os
import sys
import time

from dinov2_jax.data import sources

RECORDS_PER_SHARD = 1024


def validate(path: str) -> tuple[bytes | None, str | None]:
    """(file bytes, None) when the file decodes, else (None, why it was skipped)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read file: {e}"
    try:
        sources.decode_image(data)
    except sources.CorruptImageError as e:
        return None, str(e)
    return data, None


class Progress:
    """Prints one progress line to stderr at most every `interval_s` seconds."""

    def __init__(self, total: int, interval_s: float = 2.0):
        self.total, self.interval_s = total, interval_s
        self.start = self.last = time.monotonic()

    def update(self, done: int, skipped: int, shard: int, num_shards: int, force=False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.interval_s:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            print(f"[prepare] {done}/{self.total} files, {skipped} skipped, shard {shard}/{num_shards}"
                  f", {rate:.0f} files/s", file=sys.stderr, flush=True)


def prepare(images: str, output: str, num_shards: int | None = None,
            threads: int | None = None) -> dict:
    """Writes the shards and metadata.json; returns the metadata."""
    from array_record.python import array_record_module  # Only the writer needs it.
    paths, classes = sources.list_image_files(images)
    if not paths:
        raise ValueError(f"--images {images!r} holds no images with extensions "
                         f"{', '.join(sources.IMAGE_EXTENSIONS)}")
    num_shards = num_shards or math.ceil(len(paths) / RECORDS_PER_SHARD)
    if not 1 <= num_shards <= len(paths):
        raise ValueError(f"--shards must be in [1, {len(paths)}] for {len(paths)} files")
    os.makedirs(output, exist_ok=True)
    class_index = {name: i for i, name in enumerate(classes)}
    progress = Progress(len(paths))
    written, skipped, shard_paths = 0, [], []
    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count()) as pool:
        for shard in range(num_shards):
            shard_files = paths[shard * len(paths) // num_shards:(shard + 1) * len(paths) // num_shards]
            shard_path = os.path.join(output, f"images-{shard:05d}-of-{num_shards:05d}.array_record")
            writer = array_record_module.ArrayRecordWriter(shard_path, "group_size:1")
            for path, (data, reason) in zip(shard_files, pool.map(validate, shard_files)):
                if data is None:
                    skipped.append({"path": path, "reason": reason})
                    continue
                label = sources.folder_label(path, images, class_index)
                writer.write(sources.encode_record(data, label, os.path.relpath(path, images)))
                written += 1
            writer.close()
            shard_paths.append(shard_path)
            progress.update(written + len(skipped), len(skipped), shard + 1, num_shards)
    progress.update(written + len(skipped), len(skipped), num_shards, num_shards, force=True)
    metadata = {"images": os.path.abspath(images), "num_records": written, "classes": classes,
                "shards": [os.path.basename(p) for p in shard_paths], "skipped": skipped}
    with open(os.path.join(output, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=1)
    return metadata


def report(metadata: dict, output: str) -> str:
    lines = [f"wrote {metadata['num_records']} records in {len(metadata['shards'])} shards to "
             f"{output} ({len(metadata['classes'])} classes); skipped {len(metadata['skipped'])} "
             f"files"]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in metadata["skipped"]]
    lines.append(f"source string: arrayrecord:{os.path.join(output, '*.array_record')}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of images (class sub-folders "
                        "give labels)")
    parser.add_argument("--output", required=True, help="folder for the shards")
    parser.add_argument("--shards", type=int, default=None,
                        help=f"number of shards (default: one per {RECORDS_PER_SHARD} files)")
    parser.add_argument("--threads", type=int, default=None,
                        help="decoding threads (default: CPU count)")
    args = parser.parse_args(argv)
    try:
        metadata = prepare(args.images, args.output, args.shards, args.threads)
    except ValueError as e:
        parser.error(str(e))
    print(report(metadata, args.output))


if __name__ == "__main__":
    main()
