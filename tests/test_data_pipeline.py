"""Grain pipelines: batch format, exact resume, host sharding, bad records, eval stream."""
import io
import json
import logging
import random

import numpy as np
import pytest
from absl import flags
from PIL import Image

from dinov2_jax import configs
from dinov2_jax.data import augment, masking, pipeline

flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags.

GLOBAL, LOCAL, PATCH, N_LOCAL = 28, 14, 7, 2
N_TOKENS = (GLOBAL // PATCH) ** 2
EVAL_BAD_RECORDS = dict(max_bad_fraction=0.01, bad_fraction_min_records=1000)


def make_config(dataset: str, batch_size: int = 8, num_workers: int = 0, **train):
    """The default config with tiny crops (the data reads a full, validated config)."""
    config = configs.default_config()
    config.train.update({"dataset": dataset, "batch_size": batch_size,
                         "num_workers": num_workers,
                         "seed": random.SystemRandom().randrange(2**31), **train})
    config.crops.update(global_crops_size=GLOBAL, local_crops_size=LOCAL,
                        local_crops_number=N_LOCAL)
    config.student.patch_size = PATCH
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_format_and_masks_per_group():
    config = make_config("demo:train:num_images=40:image_size=40", batch_size=8)
    batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1,
                                              mask_groups=2))
    group = 4
    upperbound = masking.mask_upperbound(2 * group, N_TOKENS, (0.1, 0.5), 0.5)
    assert set(batch) == {"global_crops", "local_crops", "masks", "mask_indices", "masks_weight"}
    assert batch["global_crops"].shape == (2, 8, GLOBAL, GLOBAL, 3)
    assert batch["local_crops"].shape == (N_LOCAL, 8, LOCAL, LOCAL, 3)
    assert batch["global_crops"].dtype == batch["local_crops"].dtype == np.float32
    assert batch["masks"].shape == (2, 8, N_TOKENS) and batch["masks"].dtype == bool
    assert batch["mask_indices"].shape == batch["masks_weight"].shape == (2, upperbound)
    assert batch["mask_indices"].dtype == np.int32 and batch["masks_weight"].dtype == np.float32
    low, high = (0 - np.array(augment.IMAGENET_MEAN)) / augment.IMAGENET_STD, (
        (1 - np.array(augment.IMAGENET_MEAN)) / augment.IMAGENET_STD)
    assert np.all(batch["global_crops"] >= low.min() - 1e-5)
    assert np.all(batch["global_crops"] <= high.max() + 1e-5)
    for g in range(2):
        grid = np.zeros(2 * group * N_TOKENS, bool)
        used = batch["masks_weight"][g] > 0
        grid[batch["mask_indices"][g][used]] = True
        group_masks = batch["masks"][:, g * group:(g + 1) * group]
        np.testing.assert_array_equal(grid.reshape(2, group, N_TOKENS), group_masks)
        counts = group_masks.reshape(2 * group, N_TOKENS).sum(-1)
        crop_of = batch["mask_indices"][g][used] // N_TOKENS
        np.testing.assert_allclose(batch["masks_weight"][g][used], 1 / counts[crop_of], rtol=1e-6)
        assert (group_masks.reshape(2 * group, -1).any(-1)).sum() <= group


def check_resume(num_workers: int):
    config = make_config("demo:train:num_images=60:image_size=32", batch_size=4,
                         num_workers=num_workers)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1,
                                            mask_groups=2)
    take(iterator, 7)
    state = iterator.get_state()
    json.dumps(state)  # The state goes into checkpoints as JSON.
    expected = take(iterator, 5)
    restored = pipeline.make_train_iterator(config, process_index=0, process_count=1,
                                            mask_groups=2)
    restored.set_state(state)
    assert_batches_equal(take(restored, 5), expected)
    if num_workers:
        in_process = make_config("demo:train:num_images=60:image_size=32", batch_size=4,
                                 num_workers=0, seed=config.train.seed)
        same = pipeline.make_train_iterator(in_process, process_index=0, process_count=1,
                                            mask_groups=2)
        assert_batches_equal(take(same, 12)[7:], expected)  # Independent of the worker count.
        iterator.close()
        restored.close()


def test_resume_is_exact():
    check_resume(num_workers=0)


class RecordingSource:
    """Records which indices the pipeline reads."""

    def __init__(self, n: int):
        self.n, self.read = n, set()

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.read.add(index)
        return {"image": np.full((10, 12, 3), index, np.uint8), "label": index % 3,
                "key": f"recording[{index}]"}


def test_two_hosts_read_disjoint_slices_that_cover_the_data():
    config = make_config("unused", batch_size=10)
    reads = []
    for host in range(2):
        source = RecordingSource(30)
        iterator = pipeline.make_train_iterator(config, process_index=host, process_count=2,
                                                source=source)
        take(iterator, 3)  # 3 batches of 5 = the host's 15 records, one epoch.
        reads.append(source.read)
    assert reads[0].isdisjoint(reads[1])
    assert reads[0] | reads[1] == set(range(30))
    assert all(len(r) == 15 for r in reads)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_folder(path, n: int, corrupt: set[int]) -> list[str]:
    """n images in odd modes and sizes; the indices in `corrupt` are broken. Returns bad paths."""
    rng = np.random.default_rng()
    bad = []
    for i in range(n):
        rgb = Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8))
        kind = i % 8
        if i in corrupt:
            data = [b"", encode(rgb, "JPEG")[:100], b"garbage" * 20][len(bad) % 3]
            name = f"img_{i:03d}.jpg"
            bad.append(str(path / name))
        elif kind == 0:
            data, name = encode(rgb.convert("L"), "PNG"), f"img_{i:03d}.png"
        elif kind == 1:
            data, name = encode(rgb.convert("CMYK"), "JPEG"), f"img_{i:03d}.jpg"
        elif kind == 2:
            data, name = encode(rgb.convert("RGBA"), "PNG"), f"img_{i:03d}.png"
        elif kind == 3:
            data, name = encode(rgb.convert("P"), "PNG"), f"img_{i:03d}.png"
        elif kind == 4:
            sixteen = Image.fromarray(rng.integers(0, 65536, (20, 26), dtype=np.uint16))
            data, name = encode(sixteen, "PNG"), f"img_{i:03d}.png"
        elif kind == 5:
            data, name = encode(rgb.resize((3, 2)), "PNG"), f"img_{i:03d}.png"  # Tiny.
        elif kind == 6:
            data, name = encode(rgb.resize((1, 40)), "BMP"), f"img_{i:03d}.bmp"
        else:
            data, name = encode(rgb, "JPEG"), f"img_{i:03d}.jpeg"
        (path / name).write_bytes(data)
    return bad


def check_three_percent_bad(tmp_path, caplog, num_workers: int):
    bad = write_folder(tmp_path, 100, corrupt={10, 50, 90})
    config = make_config(f"folder:{tmp_path}", batch_size=10, num_workers=num_workers,
                         max_bad_fraction=0.1, bad_fraction_min_records=20)
    caplog.set_level(logging.WARNING)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    batches = take(iterator, 10)  # Exactly one epoch: 100 positions.
    assert all(np.isfinite(b["global_crops"]).all() for b in batches)
    stats = pipeline.bad_record_stats(iterator)
    assert stats["bad_records"] == 3
    assert stats["records_read"] == 103
    assert sorted(key for key, _ in stats["bad_examples"]) == sorted(bad)
    if num_workers:
        iterator.close()
    else:
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert all(path in logged for path in bad)
        assert "Skipping bad record" in logged


def test_three_percent_bad_files_train_through_with_the_right_count(tmp_path, caplog):
    check_three_percent_bad(tmp_path, caplog, num_workers=0)


def check_thirty_percent_bad(tmp_path, num_workers: int):
    bad = write_folder(tmp_path, 40, corrupt=set(range(1, 40, 3)) - {37})
    assert len(bad) == 12
    config = make_config(f"folder:{tmp_path}", batch_size=4, num_workers=num_workers,
                         bad_fraction_min_records=20)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    with pytest.raises(pipeline.TooManyBadRecordsError) as error:
        take(iterator, 20)
    message = str(error.value)
    assert "failed to read or decode" in message and "max_bad_fraction=0.01" in message
    assert any(path in message for path in bad)
    if num_workers:
        iterator.close()


def test_thirty_percent_bad_files_stop_with_a_clear_error(tmp_path):
    check_thirty_percent_bad(tmp_path, num_workers=0)


def test_bad_config_values_are_named():
    config = make_config("demo:train:num_images=40", batch_size=6)
    with pytest.raises(ValueError, match="not divisible by process_count=4"):
        pipeline.make_train_dataset(config, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="mask_groups=4"):
        pipeline.make_train_dataset(config, process_index=0, process_count=1, mask_groups=4)
    config.crops.global_crops_size = 30  # the data reads validated configs: validate names it
    with pytest.raises(configs.ConfigError, match="not a positive multiple of student.patch_size"):
        configs.validate(config, 1)
    with pytest.raises(ValueError, match="process_index 2"):
        pipeline.make_train_dataset(config, process_index=2, process_count=2)


def test_eval_stream_order_labels_and_transform():
    torch = pytest.importorskip("torch")
    from torchvision import transforms as T
    del torch
    source = "demo:val:num_images=23:image_size=40"
    reference = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)])
    from dinov2_jax.data import sources
    records = sources.open_source(source)
    batches = list(pipeline.make_eval_iterator(source, image_size=32, resize_size=36,
                                               batch_size=5, process_index=0, process_count=1,
                                               **EVAL_BAD_RECORDS))
    assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 3]
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, np.arange(23))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                  [records[i]["label"] for i in range(23)])
    for i in (0, 7, 22):
        image = batches[i // 5]["image"][i % 5]
        expected = reference(Image.fromarray(records[i]["image"])).numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(image, expected, atol=1.5 / 255 / 0.224)


def test_eval_stream_hosts_and_bad_records(tmp_path):
    bad = write_folder(tmp_path, 20, corrupt={4, 13})
    seen = []
    for host in range(2):
        iterator = pipeline.make_eval_iterator(f"folder:{tmp_path}", image_size=16, resize_size=20,
                                               batch_size=4, process_index=host, process_count=2,
                                               **EVAL_BAD_RECORDS)
        batches = list(iterator)
        seen.append(np.concatenate([b["index"] for b in batches]))
        assert all(b["image"].shape[1:] == (16, 16, 3) for b in batches)
        stats = pipeline.bad_record_stats(iterator)
        assert stats["bad_records"] == 1 and stats["records_read"] == 10
        assert stats["bad_examples"][0][0] == bad[host]  # 4 is host 0's, 13 is host 1's.
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(np.concatenate(seen)) == sorted(set(range(20)) - {4, 13})
    np.testing.assert_array_equal(seen[0], sorted(seen[0]))
