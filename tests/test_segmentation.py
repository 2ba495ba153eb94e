"""Linear segmentation: the metrics equal a NumPy transcription of mmseg's (ignore index
included), the sliding windows and their stitching are mmseg's, a linear head on a tiny
random-init backbone segments a synthetic ADE20k-layout set far above chance, bad pairs are
skipped and counted, out-of-range labels are a clear error, and the CLI writes JSON."""
import json

import numpy as np
import pytest
from PIL import Image

from dinov2_jax import weights
from dinov2_jax.configs import ConfigError
from dinov2_jax.eval import dense, dense_data, segmentation
from dinov2_jax.models import vit
from tiny_params import random_params

NUM_CLASSES = 4  # background + disc, square, triangle (ADE labels 1..4, 0 ignored)
SIZE = 64


def _mmseg_metrics(predictions, labels, num_classes, ignore_index=255):
    """mmseg's intersect_and_union summed over images, then total_area_to_metrics."""
    total = np.zeros((4, num_classes))
    for pred, label in zip(predictions, labels):
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        area_intersect = np.histogram(intersect, bins=num_classes, range=(0, num_classes - 1))[0]
        area_pred = np.histogram(pred, bins=num_classes, range=(0, num_classes - 1))[0]
        area_label = np.histogram(label, bins=num_classes, range=(0, num_classes - 1))[0]
        total += [area_intersect, area_pred + area_label - area_intersect, area_pred, area_label]
    intersect, union, _, label_area = total
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = intersect / union, intersect / label_area
    return 100 * np.nanmean(iou), 100 * intersect.sum() / label_area.sum(), 100 * np.nanmean(acc), iou


def test_metrics_match_mmseg_transcription():
    rng = np.random.default_rng()
    num_classes = 6
    labels = [rng.integers(0, num_classes - 1, (17, 23)) for _ in range(3)]  # class 5: never
    predictions = [rng.integers(0, num_classes - 2, (17, 23)) for _ in range(3)]
    for label in labels:
        label[rng.random(label.shape) < 0.2] = 255
    confusion = sum(np.asarray(segmentation.confusion_matrix(p, l, num_classes))
                    for p, l in zip(predictions, labels))
    results = segmentation.metrics_from_confusion(confusion)
    miou, aacc, macc, iou = _mmseg_metrics(predictions, labels, num_classes)
    # Integer counts on both sides; the float64 ratios differ only by rounding.
    assert results["segmentation/mIoU"] == pytest.approx(miou, abs=1e-9)
    assert results["segmentation/aAcc"] == pytest.approx(aacc, abs=1e-9)
    assert results["segmentation/mAcc"] == pytest.approx(macc, abs=1e-9)
    assert "segmentation/IoU/5" not in results  # absent from labels and predictions
    for index in range(num_classes - 1):
        assert results[f"segmentation/IoU/{index}"] == pytest.approx(100 * iou[index], abs=1e-9)


def test_windows_and_stitching_follow_mmseg_slide_inference():
    rng = np.random.default_rng()
    height, width, size, stride = 50, 83, 32, 21
    boxes = dense_data.window_boxes((height, width), size, stride)
    expected = []  # mmseg's slide_inference grid
    h_grids = max(height - size + stride - 1, 0) // stride + 1
    w_grids = max(width - size + stride - 1, 0) // stride + 1
    for h in range(h_grids):
        for w in range(w_grids):
            y2, x2 = min(h * stride + size, height), min(w * stride + size, width)
            expected.append((max(y2 - size, 0), max(x2 - size, 0), max(y2 - size, 0) + size,
                             max(x2 - size, 0) + size))
    np.testing.assert_array_equal(boxes, expected)
    maps = rng.normal(size=(len(boxes), size, size, 3)).astype(np.float32)
    total, count = np.zeros((height, width, 3)), np.zeros((height, width, 1))
    for (top, left, bottom, right), window in zip(boxes, maps):
        total[top:bottom, left:right] += window
        count[top:bottom, left:right] += 1
    stitched = np.asarray(dense.stitch_windows(maps, boxes, (height, width), False))
    # fp32 sums of at most 4 windows against float64.
    np.testing.assert_allclose(stitched, total / count, rtol=1e-5, atol=1e-5)
    flipped = np.asarray(dense.stitch_windows(maps, boxes, (height, width), True))
    np.testing.assert_allclose(flipped, (total / count)[:, ::-1], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    dense_data.write_shapes_dataset(root, "training", 80, SIZE, seed=np.random.randint(1 << 30))
    dense_data.write_shapes_dataset(root, "validation", 24, SIZE, seed=1)
    model = vit.DinoVisionTransformer(embed_dim=32, depth=4, num_heads=2, patch_size=8,
                                      img_size=SIZE, layerscale=1.0)
    return root, model, random_params(model)


def _chance_miou(source):
    """mIoU of predictions drawn from the validation labels' own class frequencies."""
    rng = np.random.default_rng(0)
    labels = [source.load(i)[1] for i in range(len(source))]
    counts = np.bincount(np.concatenate([l[l != 255] for l in labels]), minlength=NUM_CLASSES)
    predictions = [rng.choice(NUM_CLASSES, size=l.shape, p=counts / counts.sum()) for l in labels]
    return _mmseg_metrics(predictions, labels, NUM_CLASSES)[0]


def test_linear_head_segments_synthetic_ade20k_far_above_chance(shapes):
    root, model, params = shapes
    val = dense_data.open_dense_source(f"ade20k:{root}:validation:num_classes={NUM_CLASSES}")
    results, predictions = segmentation.evaluate(
        model, params, f"ade20k:{root}:training:num_classes={NUM_CLASSES}", val,
        image_size=SIZE, steps=300, lr=1e-2, warmup_steps=20, keep_predictions=2,
        progress=False)
    chance = _chance_miou(val)
    # Measured about 80 (chance about 25): flat colour vs grey texture is linear in the pixels
    # the patch embedding sees, so even random features hold it.
    assert results["segmentation/mIoU"] > 2 * chance and results["segmentation/mIoU"] > 55
    assert results["segmentation/val_images"] == 24 and results["segmentation/skipped_pairs"] == 0
    index, prediction = predictions[0]
    assert prediction.shape == val.load(index)[1].shape


def _write_pair(root, split, stem, image, mask):
    Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg")
    Image.fromarray(mask).save(root / "annotations" / split / f"{stem}.png")


def test_bad_pairs_are_skipped_and_counted_and_cli_writes_json(shapes, tmp_path):
    root, model, params = shapes
    bad = tmp_path / "ADEChallengeData2016"
    rng = np.random.default_rng()
    for split in ("training", "validation"):
        (bad / "images" / split).mkdir(parents=True)
        (bad / "annotations" / split).mkdir(parents=True)
        for i in range(6):
            _write_pair(bad, split, f"ok_{i}", *dense_data.shapes_scene(rng, SIZE))
    (bad / "annotations" / "training" / "ok_0.png").write_bytes(b"\x89PNG broken")
    image, mask = dense_data.shapes_scene(rng, SIZE)
    _write_pair(bad, "training", "ok_1", image, mask[:, :-3])  # mask of another size
    Image.fromarray(image).save(bad / "images" / "training" / "no_mask.jpg")
    weights_dir = tmp_path / "weights"
    weights.save(str(weights_dir), model, params)
    output = tmp_path / "seg.json"
    segmentation.main([
        "segmentation", f"--weights={weights_dir}",
        f"--train=ade20k:{bad}:training:num_classes={NUM_CLASSES}",
        f"--val=ade20k:{bad}:validation:num_classes={NUM_CLASSES}", f"--size={SIZE}",
        "--steps=20", "--warmup_steps=2", "--batch_size=8", "--layers=4", "--multiscale",
        "--scales=1.0,1.5", f"--output={output}"])
    record = json.loads(output.read_text())
    assert record["layers"] == 4 and record["multiscale"] is True
    results = record["results"]
    assert 0.0 <= results["mIoU"] <= 100.0 and "aAcc" in results
    assert results["skipped_pairs"] == 2 and results["unpaired_files"] == 1


def test_out_of_range_label_is_a_clear_error(tmp_path):
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image, mask = dense_data.shapes_scene(np.random.default_rng(), 32)
    Image.fromarray(image).save(root / "images" / "a.jpg")
    mask = mask.copy()
    mask[0, 0] = 9
    Image.fromarray(mask).save(root / "masks" / "a.png")
    source = dense_data.open_dense_source(f"segfolder:{root}:num_classes=5")
    with pytest.raises(ConfigError, match=r"a\.png: mask values \[9\] are out of range"):
        source.load(0)
    with pytest.raises(ConfigError, match="num_classes=N"):
        dense_data.open_dense_source(f"segfolder:{root}")
