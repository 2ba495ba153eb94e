"""`python -m dinov2_jax.data.prepare`: ArrayRecord shards that read back through `arrayrecord:`."""
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from dinov2_jax import configs
from dinov2_jax.errors import ConfigError
from dinov2_jax.data import pipeline, prepare, sources


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of valid images (several formats and modes) plus 2 broken files."""
    rng = np.random.default_rng()
    root = tmp_path / "images"
    valid = {}
    for i in range(14):
        label = i % 2
        folder = root / ("ants", "bees")[label]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")][i % 4]
        image = image.convert("L") if i % 5 == 0 else image
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        path = folder / f"{i:02d}.{ext}"
        path.write_bytes(buffer.getvalue())
        valid[os.path.relpath(path, root)] = (buffer.getvalue(), label)
    (root / "ants" / "empty.jpg").write_bytes(b"")
    (root / "bees" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root, valid


def test_prepare_writes_shards_that_read_back(image_folder, tmp_path, capsys):
    root, valid = image_folder
    output = tmp_path / "shards"
    prepare.main(["prepare", "--images", str(root), "--output", str(output), "--shards", "3"])
    report = capsys.readouterr()
    assert "wrote 14 records in 3 shards" in report.out
    assert "skipped 2 files" in report.out
    assert f"{root}/ants/empty.jpg: zero-byte image" in report.out
    assert f"{root}/bees/broken.png: cannot decode" in report.out
    assert "16/16" in report.err and "skipped=2" in report.err  # the tqdm progress bar
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["classes"] == ["ants", "bees"] and metadata["num_records"] == 14
    assert len(metadata["skipped"]) == 2 and len(metadata["shards"]) == 3
    assert sum(metadata["shard_records"].values()) == 14

    source = sources.open_source(f"arrayrecord:{output}/*.array_record")
    assert len(source) == 14
    for i in range(len(source)):
        record = source[i]
        data, label = valid[record["key"]]
        assert record["image"] == data and record["label"] == label
        np.testing.assert_array_equal(sources.decode_record(record), sources.decode_image(data))

    config = configs.default_config()
    config.train.update(dataset=f"arrayrecord:{output}/*.array_record", batch_size=4,
                        num_workers=0, seed=0)
    config.crops.update(global_crops_size=16, local_crops_size=8, local_crops_number=2)
    config.student.patch_size = 8
    batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
    assert batch["global_crops"].shape == (2, 4, 16, 16, 3)


def test_prepare_rejects_empty_folder_and_bad_shard_count(image_folder, tmp_path):
    root, _ = image_folder
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        prepare.main(["prepare", "--images", str(tmp_path / "nothing"),
                      "--output", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--shards must be in"):
        prepare.prepare(str(root), str(tmp_path / "o"), num_shards=100)


def test_a_truncated_shard_is_named_at_start_up_or_skipped_and_counted(image_folder, tmp_path):
    """A shard cut in half (a partial copy) is a start-up error naming the file; with
    skip_bad_shards the source opens without it and counts its records as skipped."""
    root, _ = image_folder
    output = tmp_path / "shards"
    metadata = prepare.prepare(str(root), str(output), num_shards=3)
    cut = output / metadata["shards"][1]
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    pattern = f"arrayrecord:{output}/*.array_record"
    with pytest.raises(sources.BadShardError, match=re.escape(str(cut))) as error:
        sources.open_source(pattern)
    assert "train.skip_bad_shards=True" in str(error.value)
    source = sources.open_source(pattern, skip_bad_shards=True)
    skipped = metadata["shard_records"][cut.name]
    assert source.skipped_shards == [str(cut)] and source.skipped_records == skipped > 0
    assert len(source) == metadata["num_records"] - skipped
