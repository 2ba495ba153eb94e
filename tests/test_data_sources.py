"""Sources: source strings, image decoding of every mode, folders, TFDS read TF-free."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from dinov2_jax.data import demo, sources


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def rgb():
    return np.random.default_rng().integers(0, 256, (21, 34, 3), dtype=np.uint8)


@pytest.mark.parametrize("spec,message", [
    ("", "non-empty"), ("nope:x", "unknown source 'nope:x'"), ("folder:", "folder:/path"),
    ("folder:/does/not/exist", "not a directory"), ("tfds:mnist", "tfds:NAME:SPLIT"),
    ("tfds:mnist:train:size=3", "unknown option 'size'"), ("demo:test", "demo split"),
    ("demo:train:num_images=x", "integers"), ("demo:train:colour=3", "unknown option"),
    ("arrayrecord:/nothing/*.array_record", "matches no files"),
])
def test_bad_source_strings_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        sources.open_source(spec)


def test_demo_source_strings():
    assert len(sources.open_source("demo")) == demo.DEFAULT_NUM_IMAGES["train"]
    assert sources.open_source("demo:train").split == "train"
    val = sources.open_source("demo:val:num_images=30:image_size=40")
    assert (val.split, len(val), val[0]["image"].shape) == ("val", 30, (40, 40, 3))


def test_decode_rgb_formats_round_trip(rgb):
    for fmt in ("PNG", "BMP", "WEBP"):
        image = Image.fromarray(rgb)
        data = encode(image, fmt) if fmt != "WEBP" else _lossless_webp(image)
        np.testing.assert_array_equal(sources.decode_image(data), rgb)
    jpeg = sources.decode_image(encode(Image.fromarray(rgb), "JPEG"))
    assert jpeg.shape == rgb.shape and jpeg.dtype == np.uint8


def _lossless_webp(image):
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"),
                                      ("CMYK", "JPEG"), ("P", "PNG"), ("1", "PNG"),
                                      ("L", "JPEG"), ("I;16", "PNG")])
def test_every_mode_becomes_rgb_uint8(rgb, mode, fmt):
    source = Image.fromarray(rgb)
    if mode == "I;16":
        values = (rgb[..., 0].astype(np.uint16) * 257)
        image = Image.fromarray(values)
        assert image.mode.startswith("I")
    elif mode == "P":
        image = source.convert("P")
        image.info["transparency"] = 0
    else:
        image = source.convert(mode)
    data = encode(image, fmt)
    decoded = sources.decode_image(data)
    assert decoded.shape == rgb.shape and decoded.dtype == np.uint8
    with Image.open(io.BytesIO(data)) as reopened:
        if mode == "I;16":
            np.testing.assert_array_equal(decoded, np.repeat(rgb[..., :1], 3, axis=-1))
        else:
            np.testing.assert_array_equal(decoded, np.asarray(reopened.convert("RGB")))


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896], [65535, 514, 1000]], np.uint16)
    decoded = sources.decode_image(encode(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(decoded[..., 0], [[0, 1, 128], [255, 2, 4]])


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0garbage", b"not an image at all" * 10])
def test_corrupt_bytes_raise_corrupt_image_error(data):
    with pytest.raises(sources.CorruptImageError):
        sources.decode_image(data)


def test_truncated_jpeg_raises(rgb):
    data = encode(Image.fromarray(np.tile(rgb, (8, 8, 1))), "JPEG")
    with pytest.raises(sources.CorruptImageError, match="cannot decode"):
        sources.decode_image(data[:len(data) // 2])


def test_arrays(rgb):
    np.testing.assert_array_equal(sources.decode_image(rgb[..., 0]),
                                  np.repeat(rgb[..., :1], 3, axis=-1))
    rgba = np.concatenate([rgb, rgb[..., :1]], axis=-1)
    np.testing.assert_array_equal(sources.decode_image(rgba), rgb)
    np.testing.assert_array_equal(sources.decode_image(rgb.astype(np.uint16) * 257), rgb)
    for bad in (np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 5), np.uint8),
                np.zeros((4, 4, 3), np.float64)):
        with pytest.raises(sources.CorruptImageError):
            sources.decode_image(bad)


def test_folder_source_labels_and_extensions(tmp_path, rgb):
    for path in ["cat/a.jpg", "cat/sub/b.PNG", "dog/c.webp", "dog/d.bmp", "root.jpeg"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / path, format={"jpg": "JPEG", "png": "PNG",
                                                           "webp": "WEBP", "bmp": "BMP",
                                                           "jpeg": "JPEG"}[path.rsplit(".", 1)[1]
                                                                           .lower()])
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    source = sources.open_source(f"folder:{tmp_path}")
    assert source.classes == ["cat", "dog"]
    records = {os.path.relpath(source[i]["key"], tmp_path): source[i] for i in range(len(source))}
    assert {k: r["label"] for k, r in records.items()} == {
        "cat/a.jpg": 0, "cat/sub/b.PNG": 0, "dog/c.webp": 1, "dog/d.bmp": 1, "root.jpeg": -1}
    assert sources.decode_record(records["cat/sub/b.PNG"]).shape == rgb.shape


def test_unreadable_file_becomes_a_bad_record(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    source = sources.FolderSource(str(tmp_path))
    os.remove(tmp_path / "a.png")
    record = source[0]
    assert "cannot read file" in record["error"]
    with pytest.raises(sources.BadRecordError, match="cannot read file"):
        sources.decode_record(record)


def test_record_encoding_round_trip(rgb):
    data = encode(Image.fromarray(rgb), "PNG")
    record = sources.parse_record(sources.encode_record(data, 7, "x/y.png"), "fallback")
    assert record == {"image": data, "label": 7, "key": "x/y.png"}
    assert "bad magic" in sources.parse_record(b"junk", "k")["error"]


tfds = pytest.importorskip("tensorflow_datasets")


class TinyJpegs(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset written without TensorFlow: JPEG bytes made with PIL, array_record."""

    VERSION = tfds.core.Version("1.0.0")
    NUM_IMAGES = {"train": 12, "test": 5}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.NUM_IMAGES}

    def _generate_examples(self, split):
        for i in range(self.NUM_IMAGES[split]):
            yield i, {"image": tiny_jpeg(split, i), "label": i % 3}


def tiny_jpeg(split: str, index: int) -> bytes:
    value = 20 * index + (100 if split == "test" else 0)
    return encode(Image.fromarray(np.full((12, 16, 3), value, np.uint8)), "JPEG")


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
    # The test environment has no TensorFlow: building and reading both run TF-free.
    TinyJpegs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = sources.open_source(f"tfds:tiny_jpegs:train:data_dir={tmp_path}")
    assert len(source) == 12
    labels, values = [], []
    for i in range(len(source)):
        record = source[i]
        assert isinstance(record["image"], bytes)  # Undecoded: decode_image does it.
        labels.append(record["label"])
        values.append(int(np.median(sources.decode_record(record))))
    assert sorted(labels) == sorted(i % 3 for i in range(12))
    assert sorted(values) == pytest.approx([20 * i for i in range(12)], abs=2)
    sliced = sources.open_source(f"tfds:tiny_jpegs:test[:60%]:data_dir={tmp_path}")
    assert len(sliced) == 3
