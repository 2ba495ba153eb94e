"""`python -m dinov2_jax.data.prepare`: ArrayRecord shards that read back through `arrayrecord:`."""
import io
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

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
    prepare.main(["--images", str(root), "--output", str(output), "--shards", "3"])
    report = capsys.readouterr()
    assert "wrote 14 records in 3 shards" in report.out
    assert "skipped 2 files" in report.out
    assert f"{root}/ants/empty.jpg: zero-byte image" in report.out
    assert f"{root}/bees/broken.png: cannot decode" in report.out
    assert "[prepare] 16/16 files, 2 skipped" in report.err
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["classes"] == ["ants", "bees"] and metadata["num_records"] == 14
    assert len(metadata["skipped"]) == 2 and len(metadata["shards"]) == 3

    source = sources.open_source(f"arrayrecord:{output}/*.array_record")
    assert len(source) == 14
    for i in range(len(source)):
        record = source[i]
        data, label = valid[record["key"]]
        assert record["image"] == data and record["label"] == label
        np.testing.assert_array_equal(sources.decode_record(record), sources.decode_image(data))

    config = ml_collections.ConfigDict({
        "train": {"dataset": f"arrayrecord:{output}/*.array_record", "batch_size": 4,
                  "num_workers": 0, "seed": 0},
        "crops": {"global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 2},
        "student": {"patch_size": 8}})
    batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
    assert batch["global_crops"].shape == (2, 4, 16, 16, 3)


def test_prepare_rejects_empty_folder_and_bad_shard_count(image_folder, tmp_path):
    root, _ = image_folder
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SystemExit):
        prepare.main(["--images", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--shards must be in"):
        prepare.prepare(str(root), str(tmp_path / "o"), num_shards=100)
