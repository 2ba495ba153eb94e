"""Linear depth: the metrics equal a NumPy transcription of the depth toolbox's (NYU mask and
Eigen crop included), SigLoss equals the reference's formula, the 1x1 layer before the 4x
upsampling equals it after, a linear head on a tiny random-init backbone beats the mean
predictor on a synthetic depth set by far, nyu: split files parse, bad pairs are skipped and
counted, and the CLI writes JSON."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dinov2_jax import configs, weights
from dinov2_jax.configs import ConfigError
from dinov2_jax.eval import dense, dense_data, depth, during_training
from dinov2_jax.models import vit
from tiny_params import random_params

SIZE = 48


def _toolbox_metrics(gt, pred):
    """The depth toolbox's `calculate` on the valid pixels (1-D arrays)."""
    thresh = np.maximum(gt / pred, pred / gt)
    err = np.log(pred) - np.log(gt)
    return {"a1": (thresh < 1.25).mean(), "a2": (thresh < 1.25 ** 2).mean(),
            "a3": (thresh < 1.25 ** 3).mean(), "abs_rel": np.mean(np.abs(gt - pred) / gt),
            "sq_rel": np.mean((gt - pred) ** 2 / gt), "rmse": np.sqrt(np.mean((gt - pred) ** 2)),
            "rmse_log": np.sqrt(np.mean(err ** 2)),
            "log10": np.mean(np.abs(np.log10(gt) - np.log10(pred))),
            "silog": np.sqrt(np.mean(err ** 2) - np.mean(err) ** 2) * 100}


def test_metrics_match_toolbox_transcription_with_nyu_mask():
    rng = np.random.default_rng()
    gt = rng.uniform(0, 12, (480, 640)).astype(np.float32)
    gt[rng.random(gt.shape) < 0.1] = 0.0  # missing measurements
    pred = np.clip(gt * rng.uniform(0.7, 1.4, gt.shape), 1e-3, 10).astype(np.float32)
    source = dense_data.DepthSource([], 1000.0, 1e-3, 10.0, True, "nyu:test")
    valid = source.eval_mask(gt)
    expected_valid = (gt > 1e-3) & (gt < 10.0)
    crop = np.zeros_like(expected_valid)
    crop[45:471, 41:601] = True  # the Eigen crop of the toolbox's NYU dataset
    np.testing.assert_array_equal(valid, expected_valid & crop)
    metrics = depth.depth_metrics(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(valid))
    expected = _toolbox_metrics(gt[valid].astype(np.float64), pred[valid].astype(np.float64))
    for name, value in expected.items():
        # fp32 means over 200k pixels against float64: relative 1e-4.
        assert float(metrics[name]) == pytest.approx(value, rel=1e-4), name


def test_sigloss_matches_reference_formula():
    rng = np.random.default_rng()
    pred = rng.uniform(0.1, 8, (2, 12, 12)).astype(np.float32)
    target = rng.uniform(0.1, 8, (2, 12, 12)).astype(np.float32)
    target[rng.random(target.shape) < 0.3] = 0.0
    valid = target > 0
    g = np.log(pred[valid].astype(np.float64) + 1e-3) - np.log(target[valid] + 1e-3)
    full = np.sqrt(np.var(g, ddof=1) + 0.15 * np.mean(g) ** 2)  # torch.var is unbiased
    warm = np.sqrt(0.15 * np.mean(g) ** 2)
    # Same-size resize is the identity; fp32 against float64.
    assert float(depth.sigloss(pred, target, 100)) == pytest.approx(full, rel=1e-5)
    assert float(depth.sigloss(pred, target, 99)) == pytest.approx(warm, rel=1e-5)


def test_linear_layer_commutes_with_the_upsampling():
    """The reference upsamples [patch, cls] 4x then applies the 1x1 layer; the head applies it
    first. Bilinear weights sum to 1, so both orders give the same bins."""
    rng = np.random.default_rng()
    patch = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    cls = rng.normal(size=(2, 6)).astype(np.float32)
    head = depth.LinearDepthHead(1e-3, 10.0)
    variables = head.init(jax.random.key(0), patch, cls, train=False)
    ours = np.asarray(head.apply(variables, patch, cls, train=False))
    features = np.concatenate([patch, np.broadcast_to(cls[:, None, None], patch.shape)], -1)
    upsampled = np.asarray(dense.resize_bilinear(jnp.asarray(features), (12, 20)))
    params = variables["params"]
    kernel = np.concatenate([params["patch"]["kernel"], params["cls"]["kernel"]], axis=0)
    logits = upsampled @ kernel + params["patch"]["bias"]
    weights_ = np.maximum(logits, 0) + 0.1
    weights_ /= weights_.sum(-1, keepdims=True)
    reference = weights_ @ np.linspace(1e-3, 10.0, depth.NUM_BINS)
    # fp32 matmuls in a different order: 1e-4 m on depths of a few metres.
    np.testing.assert_allclose(ours, reference, atol=1e-4)


@pytest.fixture(scope="module")
def depth_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    train = dense_data.write_depth_dataset(root / "train", 64, SIZE,
                                           seed=np.random.randint(1 << 30))
    val = dense_data.write_depth_dataset(root / "val", 24, SIZE, seed=1)
    model = vit.DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                      img_size=SIZE, layerscale=1.0)
    return train, val, model, random_params(model)


def test_linear_head_beats_the_mean_predictor(depth_sets):
    train, val, model, params = depth_sets
    results, predictions = depth.evaluate(
        model, params, f"depthfolder:{train}", f"depthfolder:{val}", image_size=SIZE,
        steps=300, head_batch_size=8, lr=2e-2, warmup_steps=20, keep_predictions=1,
        progress=False)
    # Haze makes depth nearly linear in brightness. Over fresh random backbones the RMSE
    # measured 0.29-0.55x the mean predictor's (about 0.6-1.1 m against 2.1 m).
    assert results["depth/rmse"] < 0.7 * results["depth/rmse_mean_baseline"]
    assert results["depth/val_images"] == 24
    assert predictions[0][1].shape == (SIZE, SIZE)


def test_nyu_split_file_and_bad_pairs_and_cli_json(depth_sets, tmp_path):
    train, val, model, params = depth_sets
    root = tmp_path / "nyu"
    lines = []
    for i, stem in enumerate(["scene_00000", "scene_00001", "scene_00002", "scene_00003"]):
        folder = root / f"room_{i}"
        folder.mkdir(parents=True)
        Image.open(train / "rgb" / f"{stem}.png").save(folder / f"rgb_{i:05d}.jpg")
        (folder / f"sync_depth_{i:05d}.png").write_bytes(
            (train / "depth" / f"{stem}.png").read_bytes())
        lines.append(f"/room_{i}/rgb_{i:05d}.jpg /room_{i}/sync_depth_{i:05d}.png 518.8579")
    (root / "room_3" / "sync_depth_00003.png").write_bytes(b"")  # unreadable depth
    lines.append("/room_9/rgb_00009.jpg None 518.8579")  # a frame without ground truth
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    source = dense_data.open_dense_source(f"nyu:{root}:train.txt")
    assert len(source) == 4 and source.unpaired == 1 and source.eigen_crop
    assert len(dense_data.open_dense_source(f"nyu:{root}")) == 4  # rgb_* next to sync_depth_*
    image, target = source.load(0)
    assert image.shape == (SIZE, SIZE, 3) and target.dtype == np.float32
    weights_dir = tmp_path / "weights"
    weights.save(str(weights_dir), model, params)
    output = tmp_path / "depth.json"
    depth.main(["depth", f"--weights={weights_dir}", f"--train=nyu:{root}:train.txt",
                f"--val=depthfolder:{val}", f"--size={SIZE}", "--steps=20",
                "--warmup_steps=2", "--regression", "--flip", f"--output={output}"])
    results = json.loads(output.read_text())["results"]
    assert results["rmse"] > 0 and "abs_rel" in results and "a1" in results
    assert results["skipped_pairs"] == 1 and results["unpaired_files"] == 1


def test_wrong_sources_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        dense_data.open_dense_source(f"depthfolder:{tmp_path / 'missing'}")
    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    with pytest.raises(ConfigError, match="no image in"):
        dense_data.open_dense_source(f"depthfolder:{tmp_path}")
    with pytest.raises(ConfigError, match="unknown option 'scal'"):
        dense_data.open_dense_source(f"depthfolder:{tmp_path}:scal=3")


def test_in_training_evaluator_runs_both_probes(depth_sets, tmp_path):
    """The train loop's evaluation callback from config.evaluation: both probes, flat
    float metrics; a source pair set by half is a config error."""
    train, val, model, params = depth_sets
    scenes = dense_data.write_shapes_dataset(tmp_path / "ade", "training", 8, SIZE)
    dense_data.write_shapes_dataset(scenes, "validation", 4, SIZE)
    config = configs.default_config()
    config.crops.global_crops_size = SIZE
    config.evaluation.update(segmentation_train=f"ade20k:{scenes}:training:num_classes=4",
                             segmentation_val=f"ade20k:{scenes}:validation:num_classes=4",
                             depth_train=f"depthfolder:{train}", depth_val=f"depthfolder:{val}",
                             dense_steps=10, batch_size=32)
    results = during_training.make_evaluator(config)(model, params)
    assert 0.0 <= results["segmentation/mIoU"] <= 100.0 and results["depth/rmse"] > 0.0
    assert all(isinstance(value, float) for value in results.values())
    config.evaluation.segmentation_val = ""
    with pytest.raises(ConfigError, match="must be set together"):
        during_training.make_evaluator(config)
