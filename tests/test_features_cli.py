"""`python -m dinov2_jax.eval.features` end to end: an image folder through the eval transform
and a .npy array as is, from dinov2_jax weights and from an official-layout .safetensors; the
written features equal the backbone's outputs (fp32, batched vs unbatched: 1e-5)."""
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from dinov2_jax import weights
from dinov2_jax.data import augment
from dinov2_jax.models import torch_layouts, vit
from tiny_params import random_params


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dinov2_jax.eval.features", *map(str, args)],
                          capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_image_folder_with_registers(tmp_path):
    model = vit.DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=14,
                                      img_size=28, layerscale=1.0, num_register_tokens=3,
                                      interpolate_offset=0.0, interpolate_antialias=True)
    params = random_params(model)
    weights.save(str(tmp_path / "weights"), model, params)
    folder = tmp_path / "images"
    files = ["cats/a.png", "cats/b.jpg", "dogs/c.png", "d.png", "dogs/e.png"]
    sizes = [(50, 40), (33, 61), (28, 28), (90, 45), (31, 30)]
    for name, (width, height) in zip(files, sizes):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.randint(0, 256, (height, width, 3), np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (folder / "dogs" / "broken.png").write_bytes(b"not an image")
    output = tmp_path / "feats.npz"
    result = _cli("--weights", tmp_path / "weights", "--input", folder, "--output", output,
                  "--size", 42, "--batch_size", 2)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable images" in result.stderr and "images" in result.stderr
    feats = np.load(output)
    assert sorted(feats["paths"].tolist()) == sorted(files)  # broken.png skipped.
    np.testing.assert_array_equal(np.diff(feats["index"]) > 0, True)  # Folder order kept.
    images = np.stack([augment.normalize(augment.eval_transform(
        np.asarray(Image.open(folder / p).convert("RGB")), 48, 42)) for p in feats["paths"]])
    out = jax.jit(model.apply)({"params": params}, images)
    assert feats["cls"].shape == (5, 32) and feats["patch"].shape == (5, 9, 32)
    assert feats["reg"].shape == (5, 3, 32)
    np.testing.assert_allclose(feats["cls"], out["x_norm_clstoken"], atol=1e-5)
    np.testing.assert_allclose(feats["patch"], out["x_norm_patchtokens"], atol=1e-5)
    np.testing.assert_allclose(feats["reg"], out["x_norm_regtokens"], atol=1e-5)


def test_npy_input_with_official_safetensors(tmp_path):
    model = vit.build_backbone("vits14")
    params = random_params(model)  # Full ViT-S/14 shapes.
    weights.write_torch_file(torch_layouts.params_to_hub(model, params),
                             str(tmp_path / "vits14.safetensors"))
    images = np.random.randn(3, 28, 42, 3).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    output = tmp_path / "out" / "feats.npz"
    result = _cli("--weights", tmp_path / "vits14.safetensors", "--arch", "vits14",
                  "--input", tmp_path / "images.npy", "--output", output, "--batch_size", 2)
    assert result.returncode == 0, result.stderr
    feats = np.load(output)
    assert set(feats.files) == {"cls", "patch", "index"}  # No registers, no paths.
    out = jax.jit(model.apply)({"params": params}, images)
    np.testing.assert_allclose(feats["cls"], out["x_norm_clstoken"], atol=1e-5)
    np.testing.assert_allclose(feats["patch"], out["x_norm_patchtokens"], atol=1e-5)
    np.testing.assert_array_equal(feats["index"], [0, 1, 2])
    np.save(tmp_path / "wrong.npy", images.astype(np.float64))
    bad = _cli("--weights", tmp_path / "vits14.safetensors", "--arch", "vits14",
               "--input", tmp_path / "wrong.npy", "--output", tmp_path / "x.npz")
    assert bad.returncode != 0 and "expected a float32 array (N, H, W, 3)" in bad.stderr
