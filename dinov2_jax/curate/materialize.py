"""The selected images of a source, written as ArrayRecord shards that training reads.

  OUTPUT/images-00000-of-0000N.array_record   records in `sources.encode_record` format
                                              (original bytes; arrays such as the demo's
                                              images are stored as PNG), labels kept
  OUTPUT/manifest.jsonl                       one line per record: shard, position in it,
                                              source index, source key, label
  OUTPUT/metadata.json                        source, counts, shards, unreadable records

Train on it with `--config.train.dataset='arrayrecord:OUTPUT/*.array_record'`. Selected
rows are rows of an embeddings folder; its `index-*.npy` files (written by `embed`) map them
to source positions, since undecodable images have no row.
"""
import io
import json
import math
import sys

import numpy as np
import tqdm
from array_record.python import array_record_module
from etils import epath
from PIL import Image

from dinov2_jax.configs import ConfigError
from dinov2_jax.curate import embeddings as emb
from dinov2_jax.data import prepare, sources


def image_bytes(image) -> bytes:
    """Encoded bytes of a record's image: bytes as they are, a uint8 array as PNG."""
    if isinstance(image, np.ndarray):
        buffer = io.BytesIO()
        Image.fromarray(sources.decode_image(image)).save(buffer, format="PNG")
        return buffer.getvalue()
    return bytes(image)


def source_positions(rows: np.ndarray, embeddings: emb.Embeddings | None) -> np.ndarray:
    """Source positions of embedding rows (the rows themselves without an index)."""
    index = None if embeddings is None else embeddings.source_index()
    return rows if index is None else index[rows]


def materialize(source_spec: str, positions: np.ndarray, output, *,
                records_per_shard: int = prepare.RECORDS_PER_SHARD,
                selection_name: str = "selection", progress: bool = True) -> dict:
    """Writes source records `positions` (in that order) to `output`; returns the metadata.
    `selection_name` names the selection in error messages."""
    try:
        source = sources.open_source(source_spec)
    except ValueError as e:
        raise ConfigError(f"--source: {e}") from None
    positions = np.asarray(positions, np.int64)
    bad = (positions < 0) | (positions >= len(source))
    if bad.any():
        row = int(np.argmax(bad))
        raise ConfigError(f"{selection_name}: row {row} is source position {positions[row]}, "
                          f"outside the {len(source)} images of {source_spec}")
    if not len(positions):
        raise ConfigError("the selection is empty")
    if records_per_shard < 1:
        raise ConfigError(f"--records_per_shard must be >= 1, got {records_per_shard}")
    output = epath.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(len(positions) / records_per_shard)
    shards, skipped, written = [], [], 0
    bar = tqdm.tqdm(total=len(positions), unit="img", desc="materialize", file=sys.stderr,
                    disable=not progress)
    with (output / "manifest.jsonl").open("w") as manifest:
        for shard in range(num_shards):
            name = f"images-{shard:05d}-of-{num_shards:05d}.array_record"
            writer = array_record_module.ArrayRecordWriter(str(output / name), "group_size:1")
            in_shard = 0
            for position in positions[shard * records_per_shard:(shard + 1) * records_per_shard]:
                record = source[int(position)]
                if "error" in record:
                    skipped.append({"index": int(position), "key": record["key"],
                                    "reason": record["error"]})
                    continue
                writer.write(sources.encode_record(image_bytes(record["image"]),
                                                   record["label"], record["key"]))
                manifest.write(json.dumps({"shard": name, "position": in_shard,
                                           "index": int(position), "key": record["key"],
                                           "label": int(record["label"])}) + "\n")
                in_shard += 1
            writer.close()
            shards.append(name)
            written += in_shard
            bar.update(min(records_per_shard, len(positions) - shard * records_per_shard))
    bar.close()
    metadata = {"source": source_spec, "num_records": written, "shards": shards,
                "skipped": skipped}
    emb.save_json(output / "metadata.json", metadata)
    return metadata
