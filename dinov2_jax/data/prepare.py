"""Writes an image folder as ArrayRecord shards for the `arrayrecord:` source.

  python -m dinov2_jax.data.prepare --images DIR --output DIR [--shards N] [--threads N]

DIR may be a local folder or gs://bucket/path (etils.epath) on either side.

Every image under DIR (recursive; jpg/jpeg/png/webp/bmp) is read and decoded once to
validate it; valid files are stored with their original bytes, their label (the index of
their top-level sub-folder, sorted as torchvision's ImageFolder; -1 for files directly under
DIR) and their path relative to DIR. Files that cannot be read or decoded are skipped and
reported with the reason. Output:

  OUTPUT/images-00000-of-0000N.array_record ...   records in sources.encode_record format
  OUTPUT/metadata.json                            classes, counts (per shard too), and every
                                                  skipped file

Train on it with `--config.train.dataset='arrayrecord:OUTPUT/*.array_record'`.
"""
import concurrent.futures
import json
import math
import os
import tempfile

import tqdm
from absl import flags
from array_record.python import array_record_module
from etils import epath

from dinov2_jax import cli
from dinov2_jax.data import sources
from dinov2_jax.errors import ConfigError

RECORDS_PER_SHARD = 1024


def validate(path: str) -> tuple[bytes | None, str | None]:
    """(file bytes, None) when the file decodes, else (None, why it was skipped)."""
    try:
        data = epath.Path(path).read_bytes()
    except OSError as e:
        return None, f"cannot read file: {e}"
    try:
        sources.decode_image(data)
    except sources.CorruptImageError as e:
        return None, str(e)
    return data, None


def _write_shard(path: epath.Path, records: list[bytes]) -> None:
    """Writes one ArrayRecord shard; to an object store (gs://) through a local temp file,
    since the ArrayRecord writer writes local files only."""
    local = "://" not in str(path)
    with tempfile.TemporaryDirectory() as tmp:
        target = str(path) if local else os.path.join(tmp, path.name)
        writer = array_record_module.ArrayRecordWriter(target, "group_size:1")
        for record in records:
            writer.write(record)
        writer.close()
        if not local:
            epath.Path(target).copy(path, overwrite=True)


def prepare(images: str, output: str, num_shards: int | None = None,
            threads: int | None = None) -> dict:
    """Writes the shards and metadata.json (local or gs:// paths); returns the metadata."""
    paths, classes = sources.list_image_files(images)
    if not paths:
        raise ConfigError(f"--images {images!r} holds no images with extensions "
                          f"{', '.join(sources.IMAGE_EXTENSIONS)}")
    num_shards = num_shards or math.ceil(len(paths) / RECORDS_PER_SHARD)
    if not 1 <= num_shards <= len(paths):
        raise ConfigError(f"--shards must be in [1, {len(paths)}] for {len(paths)} files")
    output = epath.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    class_index = {name: i for i, name in enumerate(classes)}
    skipped, shard_records = [], {}
    progress = tqdm.tqdm(total=len(paths), desc="prepare", unit="file")
    with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count()) as pool:
        for shard in range(num_shards):
            shard_files = paths[shard * len(paths) // num_shards:
                                (shard + 1) * len(paths) // num_shards]
            records = []
            for path, (data, reason) in zip(shard_files, pool.map(validate, shard_files)):
                progress.update()
                if data is None:
                    skipped.append({"path": path, "reason": reason})
                    continue
                label = sources.folder_label(path, images, class_index)
                key = str(epath.Path(path).relative_to(epath.Path(images)))
                records.append(sources.encode_record(data, label, key))
            shard_path = output / f"images-{shard:05d}-of-{num_shards:05d}.array_record"
            _write_shard(shard_path, records)
            shard_records[shard_path.name] = len(records)
            progress.set_postfix(skipped=len(skipped), shard=f"{shard + 1}/{num_shards}")
    progress.close()
    metadata = {"images": images if "://" in images else os.path.abspath(images),
                "num_records": sum(shard_records.values()), "classes": classes,
                "shards": list(shard_records), "shard_records": shard_records,
                "skipped": skipped}
    (output / "metadata.json").write_text(json.dumps(metadata, indent=1))
    return metadata


def report(metadata: dict, output: str) -> str:
    lines = [f"wrote {metadata['num_records']} records in {len(metadata['shards'])} shards to "
             f"{output} ({len(metadata['classes'])} classes); skipped {len(metadata['skipped'])} "
             f"files"]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in metadata["skipped"]]
    lines.append(f"source string: arrayrecord:{epath.Path(output) / '*.array_record'}")
    return "\n".join(lines)


def _define(flag_values):
    flags.DEFINE_string("images", None, "folder of images (class sub-folders give labels), "
                        "local or gs://", flag_values=flag_values, required=True)
    flags.DEFINE_string("output", None, "folder for the shards, local or gs://",
                        flag_values=flag_values, required=True)
    flags.DEFINE_integer("shards", None, f"number of shards (default: one per "
                         f"{RECORDS_PER_SHARD} files)", flag_values=flag_values)
    flags.DEFINE_integer("threads", None, "decoding threads (default: CPU count)",
                         flag_values=flag_values)


def main(argv=None) -> None:
    flag_values = cli.parse(argv, _define, __doc__)
    metadata = prepare(flag_values.images, flag_values.output, flag_values.shards,
                       flag_values.threads)
    print(report(metadata, flag_values.output))


if __name__ == "__main__":
    cli.run(main)
