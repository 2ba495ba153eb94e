"""Linear probe: the grid recovers a linearly separable problem and picks the right head, the
optimiser is torch's SGD + CosineAnnealingLR of the reference, the features are the
reference's `get_intermediate_layers` inputs, and the API and CLI run end to end.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dinov2_jax import weights as weights_lib
from dinov2_jax.eval import extract, linear
from dinov2_jax.models import vit
from tiny_params import random_params


def _separable_problem(n, weights, dim):
    """Labels = argmax of a random linear map of [cls of the 4th-last block, patch mean]
    with a margin of 1; the other blocks are noise. Only the heads that see both inputs (4
    blocks + avgpool) can be right everywhere."""
    blocks = np.random.randn(3 * n, 4, dim).astype(np.float32)
    patch_mean = np.random.randn(3 * n, dim).astype(np.float32)
    logits = np.concatenate([blocks[:, 0], patch_mean], axis=1) @ weights
    top2 = np.sort(logits, axis=1)[:, -2:]
    keep = np.flatnonzero(top2[:, 1] - top2[:, 0] > 1.0)[:n]
    return {"blocks_cls": blocks[keep], "patch_mean": patch_mean[keep]}, logits[keep].argmax(1)


def _numpy_accuracy(heads, features, labels):
    """Top-1 of every head, computed directly from the returned weights."""
    accuracy = {}
    for n_last_blocks in linear.N_LAST_BLOCKS:
        for avgpool in linear.AVGPOOL:
            head = jax.tree.map(np.asarray, heads[linear.group_name(n_last_blocks, avgpool)])
            x = features["blocks_cls"][:, -n_last_blocks:].reshape(len(labels), -1)
            if avgpool:
                x = np.concatenate([x, features["patch_mean"]], axis=1)
            for lr, kernel, bias in zip(linear.LEARNING_RATES, head["kernel"], head["bias"]):
                name = linear.head_name(n_last_blocks, avgpool, lr)
                accuracy[name] = 100.0 * np.mean((x @ kernel + bias).argmax(1) == labels)
    return accuracy


def test_recovers_separable_problem_and_picks_the_best_head():
    dim, num_classes = 8, 4
    weights = np.random.randn(2 * dim, num_classes)
    train, train_labels = _separable_problem(2000, weights, dim)
    val, val_labels = _separable_problem(500, weights, dim)
    results, heads = linear.linear_probe(train, train_labels, val, val_labels, epochs=3,
                                         epoch_length=100, batch_size=64)
    assert len([k for k in results if k.startswith("linear/top1/")]) == 52
    assert results["linear/top1"] >= 99.0
    assert results["linear/best_n_last_blocks"] == 4 and results["linear/best_avgpool"] == 1
    # The reported numbers are the heads' own, and the best is their argmax (first on ties).
    direct = _numpy_accuracy(heads, val, val_labels)
    for name, value in direct.items():
        assert results[f"linear/top1/{name}"] == pytest.approx(value, abs=1e-9), name
    best = max(direct, key=direct.get)
    assert best == linear.head_name(4, True, results["linear/best_lr"])
    # Heads that miss an input cannot be right everywhere.
    assert max(v for k, v in direct.items() if not k.startswith("blocks4_avgpool")) < 90


def test_optimizer_matches_torch_sgd_with_cosine_annealing():
    torch = pytest.importorskip("torch")
    lrs, batch, steps, dim, classes = (0.1, 0.003), 64, 7, 6, 3
    kernel = 0.01 * np.random.randn(len(lrs), dim, classes).astype(np.float32)
    grads = np.random.randn(steps, len(lrs), dim, classes).astype(np.float32)
    optimizer = linear.make_optimizer(lrs, batch, steps)

    @jax.jit
    def step(params, state, grad):
        updates, state = optimizer.update({"kernel": grad}, state, params)
        return optax.apply_updates(params, updates), state

    params = {"kernel": jnp.asarray(kernel)}
    state = optimizer.init(params)
    for g in grads:
        params, state = step(params, state, g)
    for h, lr in enumerate(lrs):
        weight = torch.nn.Parameter(torch.from_numpy(kernel[h].copy()))
        sgd = torch.optim.SGD([weight], lr=lr * batch / 256, momentum=0.9, weight_decay=0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, steps, eta_min=0)
        for g in grads:
            weight.grad = torch.from_numpy(g[h].copy())
            sgd.step()
            schedule.step()
        np.testing.assert_allclose(np.asarray(params["kernel"][h]), weight.detach().numpy(),
                                   rtol=1e-5, atol=1e-7)


def _tiny(directory=None, depth=4):
    model = vit.DinoVisionTransformer(embed_dim=32, depth=depth, num_heads=2, patch_size=14,
                                      img_size=28, layerscale=1.0, num_register_tokens=2)
    params = random_params(model)
    if directory is not None:
        weights_lib.save(str(directory), model, params)
    return model, params


def test_probe_features_are_the_reference_inputs():
    model, params = _tiny()
    images = np.random.randn(5, 28, 42, 3).astype(np.float32)
    ours = jax.jit(lambda p, x: extract.backbone_features(
        model, p, x, features=("cls", "blocks_cls", "patch_mean")))(params, images)
    layers = jax.jit(lambda p, x: vit.get_intermediate_layers(
        model, p, x, n=4, return_class_token=True))(params, images)
    np.testing.assert_allclose(ours["blocks_cls"], np.stack([c for _, c in layers], 1),
                               atol=1e-6)
    np.testing.assert_allclose(ours["patch_mean"], np.asarray(layers[-1][0]).mean(1), atol=1e-6)
    np.testing.assert_allclose(ours["cls"], ours["blocks_cls"][:, -1], atol=1e-6)
    bf16 = extract.extract(model, params, extract.array_batches(images, 3), progress=False,
                           features=("blocks_cls",), dtype=jnp.bfloat16)
    # bf16 (unit roundoff 2^-9 = 2e-3) through 4 blocks: relative L2 error median 0.008, max
    # 0.0105 over 60 draws; single entries of magnitude ~3 stray by up to 0.05, so no atol.
    error = np.linalg.norm(np.asarray(bf16["blocks_cls"], np.float32) - ours["blocks_cls"])
    relative = error / np.linalg.norm(ours["blocks_cls"])
    assert 1e-4 < relative < 2e-2, relative  # really computed in bf16, and close


def test_linear_eval_and_cli(tmp_path):
    _tiny(tmp_path / "weights", depth=2)
    output = tmp_path / "linear.json"
    cli = subprocess.run(
        [sys.executable, "-m", "dinov2_jax.eval.linear", "--weights", str(tmp_path / "weights"),
         "--train", "demo:train:num_images=40:image_size=32",
         "--val", "demo:val:num_images=16:image_size=32", "--size", "28", "--batch_size", "16",
         "--epochs", "2", "--epoch_length", "5", "--train_batch_size", "8",
         "--n_last_blocks", "1,2", "--lrs", "0.01,0.1", "--output", str(output)],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert cli.returncode == 0, cli.stderr
    assert "linear/top1" in cli.stdout and "linear heads" in cli.stderr  # Progress shown.
    results = json.loads(output.read_text())["results"]
    assert len([k for k in results if k.startswith("linear/top1/")]) == 2 * 2 * 2
    assert results["linear/best_n_last_blocks"] in (1, 2)
    assert 0 <= results["linear/top1"] <= 100
    with pytest.raises(ValueError, match=r"n_last_blocks=4 must be in \[1, depth=2\]"):
        linear.linear_eval(*weights_lib.load(str(tmp_path / "weights")), "demo:train:num_images=4",
                           "demo:val:num_images=4", image_size=28, resize_size=32, epochs=1,
                           epoch_length=1, progress=False)
