"""Image sources: one source string -> a random-access source of image records; image decoding.

A source string selects the data:

  demo[:train|val][:num_images=N][:image_size=S]   the embedded synthetic dataset (demo.py)
  folder:/path                                      an image folder, scanned recursively (or gs://...)
  arrayrecord:/path/*.array_record                  shards written by `python -m dinov2_jax.data.prepare`
                                                    (a gs://bucket/... pattern works too)
  tfds:NAME:SPLIT[:data_dir=/x][:image_key=image][:label_key=label]
                                                    a TFDS dataset prepared in array_record format,
                                                    read TF-free with `tfds.data_source`. NAME may
                                                    carry a config and version
                                                    (`imagenet2012_subset/10pct:5.0.0`); SPLIT may
                                                    be a TFDS slice (`train[:10%]`).

Every source has `len()` and `source[i]`, which returns a record
  {"image": encoded bytes or a uint8 HWC array, "label": int (-1 when unknown),
   "key": str naming the record in error messages (a path, or `source[index]`)}
plus "error": str when the record could not even be read (an unreadable file, a malformed
ArrayRecord entry); `decode_record` turns such records into `BadRecordError`.

`decode_image` is the single place where image bytes or arrays become RGB uint8 arrays: every
PIL mode is converted (alpha dropped as PIL's convert("RGB") does, 16-bit scaled to 8-bit),
and corrupt, truncated or zero-byte data raises `CorruptImageError`.
"""
import concurrent.futures
import io
import json
import os
import re
import struct

import grain
import numpy as np
from absl import logging
from array_record.python import array_record_module
from etils import epath
from PIL import Image

from dinov2_jax.data import demo, natural
from dinov2_jax.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
UNKNOWN_LABEL = -1
_RECORD_MAGIC = b"DJIR"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadRecordError(ValueError):
    """A record that cannot be turned into an image (unreadable, malformed or corrupt)."""


class CorruptImageError(BadRecordError):
    """Image data that does not decode: corrupt, truncated, zero bytes, or zero pixels."""


def _rgb_from_array(array: np.ndarray) -> np.ndarray:
    """Converts a gray, gray+alpha, RGB or RGBA array (uint8, uint16 or bool) to RGB uint8."""
    if array.dtype == np.uint16:
        array = np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise CorruptImageError(f"unsupported image array dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise CorruptImageError(f"unsupported image array shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise CorruptImageError(f"image has zero pixels (shape {array.shape})")
    channels = array.shape[-1]
    if channels in (1, 2):
        array = np.repeat(array[:, :, :1], 3, axis=-1)
    return np.ascontiguousarray(array[:, :, :3])


def _rgb_from_pil(image: Image.Image) -> np.ndarray:
    """Converts a loaded PIL image of any mode to an RGB uint8 array."""
    if image.width == 0 or image.height == 0:
        raise CorruptImageError(f"image has zero pixels ({image.width}x{image.height})")
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32)
        return _rgb_from_array(np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8))
    if image.mode == "F":
        return _rgb_from_array(np.round(np.clip(np.asarray(image), 0, 255)).astype(np.uint8))
    if image.mode == "RGB":
        return np.asarray(image)
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def decode_image(data) -> np.ndarray:
    """Decodes encoded bytes (any PIL format) or an image array to an (H, W, 3) uint8 RGB array.

    Raises CorruptImageError for zero-byte, truncated, corrupt or zero-pixel data and for
    modes that cannot be converted.
    """
    if isinstance(data, np.ndarray):
        return _rgb_from_array(data)
    if data is None or len(data) == 0:
        raise CorruptImageError("zero-byte image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _rgb_from_pil(image)
    except CorruptImageError:
        raise
    except Exception as e:  # Any failure to decode bytes means the data is corrupt.
        raise CorruptImageError(
            f"cannot decode {len(data)}-byte image: {type(e).__name__}: {e}") from e


def decode_record(record: dict) -> np.ndarray:
    """Decodes a source record's image, raising BadRecordError when it was unreadable."""
    if "error" in record:
        raise BadRecordError(record["error"])
    return decode_image(record["image"])


def encode_record(image_bytes: bytes, label: int, key: str) -> bytes:
    """Serialises one ArrayRecord entry: magic, header length, JSON header, then image bytes."""
    header = json.dumps({"label": int(label), "key": key}).encode()
    return _RECORD_MAGIC + struct.pack("<I", len(header)) + header + bytes(image_bytes)


def parse_record(serialized: bytes, fallback_key: str) -> dict:
    """Inverse of encode_record; malformed entries become records with an "error"."""
    if serialized[:4] != _RECORD_MAGIC or len(serialized) < 8:
        return {"image": None, "label": UNKNOWN_LABEL, "key": fallback_key,
                "error": "not a dinov2_jax image record (bad magic)"}
    (header_len,) = struct.unpack("<I", serialized[4:8])
    try:
        header = json.loads(serialized[8:8 + header_len])
    except ValueError as e:
        return {"image": None, "label": UNKNOWN_LABEL, "key": fallback_key,
                "error": f"malformed record header: {e}"}
    return {"image": serialized[8 + header_len:], "label": int(header["label"]),
            "key": header["key"]}


def _walk_order(relative: epath.Path) -> tuple:
    """Sort key that lists files as a sorted top-down os.walk does: a folder's own files
    before its sub-folders, each level in name order."""
    *folders, name = relative.parts
    return tuple((1, folder) for folder in folders) + ((0, name),)


def list_image_files(root) -> tuple[list[str], list[str]]:
    """Image paths under root (recursive, sorted) and the class names (top-level sub-folders).

    `root` is a local path or a URL (gs://...) that etils.epath reads."""
    root = epath.Path(root)
    relative = sorted(((folder / name).relative_to(root) for folder, _, names in root.walk()
                       for name in names if name.lower().endswith(IMAGE_EXTENSIONS)),
                      key=_walk_order)
    paths = [str(root / p) for p in relative]
    classes = sorted({p.parts[0] for p in relative if len(p.parts) > 1})
    return paths, classes


def folder_label(path: str, root: str, class_index: dict[str, int]) -> int:
    """Label of a file: index of its top-level sub-folder, -1 for files directly under root."""
    parts = epath.Path(path).relative_to(epath.Path(root)).parts
    return class_index[parts[0]] if len(parts) > 1 else UNKNOWN_LABEL


class FolderSource:
    """Image files under a folder, recursively; top-level sub-folders name the classes.

    Labels follow torchvision's ImageFolder order (sorted sub-folder names); files directly
    under the root get label -1. Records hold the file's bytes, decoded later.
    """

    def __init__(self, root: str):
        if not epath.Path(root).is_dir():
            raise ValueError(f"folder source {root!r} is not a directory")
        self.root = root
        self.paths, self.classes = list_image_files(root)
        if not self.paths:
            raise ValueError(f"folder source {root!r} holds no images with extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
        self._class_index = {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        label = folder_label(path, self.root, self._class_index)
        try:
            data = epath.Path(path).read_bytes()
        except OSError as e:
            return {"image": None, "label": label, "key": path, "error": f"cannot read file: {e}"}
        return {"image": data, "label": label, "key": path}


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob pattern, local or a URL (gs://bucket/dir/*.array_record)."""
    path = epath.Path(pattern)
    parts = path.parts
    first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if first is None:
        return [pattern] if path.exists() else []
    base = epath.Path(*parts[:first]) if first else epath.Path(".")
    return sorted(str(p) if first else os.path.relpath(str(p))
                  for p in base.glob("/".join(parts[first:])))


class BadShardError(ConfigError):
    """An ArrayRecord shard that cannot be opened (truncated, corrupt, not ArrayRecord)."""


class ArrayRecordSource:
    """ArrayRecord shards of image records written by `dinov2_jax.data.prepare`.

    Every shard is opened when the source opens. A shard that cannot be (a partial copy cut
    off mid-file, corrupt bytes) is a BadShardError naming it, or, with `skip_bad_shards`, a
    warning: the source goes on without it and counts its records (from the shards'
    metadata.json, when prepare wrote one) in `skipped_records`.
    """

    def __init__(self, pattern: str, skip_bad_shards: bool = False):
        self.paths = glob(pattern)
        if not self.paths:
            raise ValueError(f"arrayrecord source {pattern!r} matches no files")
        self.skipped_shards, self.skipped_records = [], 0
        bad = _unreadable_shards(self.paths)
        for path, reason in bad:
            if not skip_bad_shards:
                raise BadShardError(
                    f"arrayrecord shard {path} cannot be read ({reason}): it is truncated or "
                    "corrupt, e.g. a partial copy. Copy it again or re-create it with `python -m "
                    "dinov2_jax.data.prepare`, or set train.skip_bad_shards=True to train "
                    "without it")
            records = _records_in_metadata(path)
            logging.warning("skipping unreadable arrayrecord shard %s (%s)%s", path, reason,
                            "" if records is None else f": {records} records skipped")
            self.skipped_shards.append(path)
            self.skipped_records += records or 0
        self.paths = [p for p in self.paths if p not in self.skipped_shards]
        if not self.paths:
            raise BadShardError(f"arrayrecord source {pattern!r}: no readable shard")
        self._records = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        key = f"arrayrecord[{index}]"
        try:
            serialized = self._records[index]
        except Exception as e:  # A read error inside a shard is one bad record, not a crash.
            return {"image": None, "label": UNKNOWN_LABEL, "key": key,
                    "error": f"cannot read ArrayRecord entry: {type(e).__name__}: {e}"}
        return parse_record(serialized, fallback_key=key)


def _unreadable_shards(paths: list[str]) -> list[tuple[str, str]]:
    """(path, reason) of each shard whose ArrayRecord footer and index cannot be read."""
    def check(path):
        try:
            array_record_module.ArrayRecordReader(path).close()
        except Exception as e:  # Riegeli reports every kind of damage as a plain error.
            return path, (" ".join(str(e).split())[:300] or type(e).__name__)
        return None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return [bad for bad in pool.map(check, paths) if bad is not None]


def _records_in_metadata(shard: str) -> int | None:
    """The shard's record count from the metadata.json that prepare writes beside it."""
    metadata = epath.Path(shard).parent / "metadata.json"
    try:
        return json.loads(metadata.read_text())["shard_records"][epath.Path(shard).name]
    except (OSError, KeyError, ValueError):
        return None


class TfdsSource:
    """A TFDS dataset prepared in array_record format, read TF-free with `tfds.data_source`.

    Images are requested undecoded (encoded bytes) so that decoding, mode conversion and
    corrupt-data handling go through `decode_image` like every other source.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds  # Imported here: heavy, and only this source needs it.
        self.name, self.split = name, split
        self.image_key, self.label_key = image_key, label_key
        self._records = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False,
            decoders={image_key: tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        key = f"tfds:{self.name}:{self.split}[{index}]"
        try:
            example = self._records[index]
        except Exception as e:  # Deserialisation errors of any type mean a malformed record.
            return {"image": None, "label": UNKNOWN_LABEL, "key": key,
                    "error": f"cannot read TFDS record: {type(e).__name__}: {e}"}
        label = int(example[self.label_key]) if self.label_key in example else UNKNOWN_LABEL
        return {"image": example[self.image_key], "label": label, "key": key}


def _split_options(parts: list[str], allowed: tuple[str, ...], spec: str):
    """Separates `key=value` parts from positional parts, rejecting unknown keys."""
    positional, options = [], {}
    for part in parts:
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in allowed:
                raise ValueError(f"source {spec!r}: unknown option {key!r} (allowed: {', '.join(allowed)})")
            options[key] = value
        else:
            positional.append(part)
    return positional, options


def open_source(spec: str, skip_bad_shards: bool = False):
    """Parses a source string (see the module docstring) and returns the random-access source.

    `skip_bad_shards`: an unreadable ArrayRecord shard is skipped with a warning instead of
    raising BadShardError (train.skip_bad_shards)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"source must be a non-empty string, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind == "demo":
        positional, options = _split_options(rest.split(":") if rest else [],
                                             ("num_images", "image_size", "seed"), spec)
        if len(positional) > 1 or (positional and positional[0] not in demo.SPLITS):
            raise ValueError(f"source {spec!r}: demo split must be one of {', '.join(demo.SPLITS)}")
        try:
            int_options = {k: int(v) for k, v in options.items()}
        except ValueError as e:
            raise ValueError(f"source {spec!r}: demo options must be integers ({e})") from e
        return demo.DemoSource(split=positional[0] if positional else "train", **int_options)
    if kind == "natural":
        return natural.NaturalSource.from_spec(spec)
    if kind == "folder":
        if not rest:
            raise ValueError(f"source {spec!r}: expected folder:/path/to/images")
        return FolderSource(rest)
    if kind == "arrayrecord":
        if not rest:
            raise ValueError(f"source {spec!r}: expected arrayrecord:/path/*.array_record")
        return ArrayRecordSource(rest, skip_bad_shards)
    if kind == "tfds":
        parts = re.split(r":(?![^\[]*\])", rest)  # Colons inside a split slice [..] stay.
        positional, options = _split_options(parts, ("data_dir", "image_key", "label_key"), spec)
        if len(positional) < 2 or not all(positional):
            raise ValueError(f"source {spec!r}: expected tfds:NAME:SPLIT[:data_dir=/x]")
        return TfdsSource(":".join(positional[:-1]), positional[-1], **options)
    raise ValueError(f"unknown source {spec!r}: expected one of demo[:train|val], folder:/path, "
                     "arrayrecord:/path/*.array_record, tfds:NAME:SPLIT[:data_dir=/x]")
