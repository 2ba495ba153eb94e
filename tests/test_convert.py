"""Weight interop with Hugging Face transformers and timm, both directions, and the CLI.

Each library's own interpolation is mirrored by the backbone's flags (docs/reference.md,
Export layouts):
HF resizes by size (offset 0) without antialias for Dinov2Model and with antialias for
registers; timm resizes by size with antialias. Tolerance 1e-4 max abs (fp32, summation order).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax import configs, convert, weights
from dinov2_jax.configs import ConfigError
from dinov2_jax.models import torch_layouts, vit
from dinov2_jax.train import checkpoint
from tiny_params import random_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def _perturb(module):
    with torch.no_grad():
        for value in module.state_dict().values():
            value.add_(torch.randn_like(value) * 0.02)
    return module.eval()


def _hf_model(registers, swiglu):
    kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=518,
                  patch_size=14, use_swiglu_ffn=swiglu)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs)
        return _perturb(transformers.Dinov2WithRegistersModel(config))
    return _perturb(transformers.Dinov2Model(transformers.Dinov2Config(**kwargs)))


def _ours_like_hf(registers, swiglu):
    return vit.DinoVisionTransformer(
        embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=518, layerscale=1.0,
        ffn_layer="swiglu" if swiglu else "mlp", num_register_tokens=4 if registers else 0,
        interpolate_offset=0.0, interpolate_antialias=registers)


def _hf_forward(hf, images, masks=None):
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        kwargs = {} if masks is None else {"bool_masked_pos": torch.from_numpy(masks)}
        return hf(pixel_values=pixels, **kwargs).last_hidden_state.numpy()


def _compare(out, hidden, registers):
    np.testing.assert_allclose(np.asarray(out["x_norm_clstoken"]), hidden[:, 0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["x_norm_patchtokens"]), hidden[:, 1 + registers:],
                               atol=1e-4)
    if registers:
        np.testing.assert_allclose(np.asarray(out["x_norm_regtokens"]), hidden[:, 1:1 + registers],
                                   atol=1e-4)


@pytest.mark.parametrize("registers,swiglu", [(False, False), (True, False), (False, True)])
def test_huggingface_import_and_export(tmp_path, registers, swiglu):
    hf = _hf_model(registers, swiglu)
    model = _ours_like_hf(registers, swiglu)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    # HF >= 5 names q/k/v/o_proj in memory; its on-disk format is what users exchange.
    hf.save_pretrained(tmp_path / "theirs")
    from safetensors.numpy import load_file
    on_disk = load_file(str(tmp_path / "theirs" / "model.safetensors"))
    params = torch_layouts.hub_to_params(model, torch_layouts.canonicalize(on_disk, model))
    reg = 4 if registers else 0
    for height, width, masked in [(224, 224, False), (224, 224, True), (182, 266, False)]:
        images = np.random.randn(2, height, width, 3).astype(np.float32)
        masks = (np.random.rand(2, (height // 14) * (width // 14)) < 0.4) if masked else None
        out = model.apply({"params": params}, jnp.asarray(images),
                          None if masks is None else jnp.asarray(masks))
        _compare(out, _hf_forward(hf, images, masks), reg)
    # Export ours and load with from_pretrained: nothing missing, nothing unexpected.
    weights.export(model, params, str(tmp_path / "ours"), "hf")
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    loaded, info = cls.from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    images = np.random.randn(2, 224, 224, 3).astype(np.float32)
    _compare(model.apply({"params": params}, jnp.asarray(images)),
             _hf_forward(loaded.eval(), images), reg)
    for key, value in state.items():
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value, err_msg=key)


@pytest.mark.parametrize("name,embed_dim", [("vit_small_patch14_dinov2", 64),
                                            ("vit_small_patch14_reg4_dinov2", 64),
                                            ("vit_giant_patch14_dinov2", 96)])
def test_timm_import_and_export(tmp_path, name, embed_dim):
    registers = 4 if "reg4" in name else 0
    tm = _perturb(timm.create_model(name, pretrained=False, depth=2, embed_dim=embed_dim,
                                    num_heads=4, dynamic_img_size=True))
    model = vit.DinoVisionTransformer(
        embed_dim=embed_dim, depth=2, num_heads=4, patch_size=14, img_size=518, layerscale=1.0,
        ffn_layer="swiglu" if "giant" in name else "mlp", num_register_tokens=registers,
        interpolate_offset=0.0, interpolate_antialias=True)
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    params = torch_layouts.hub_to_params(model, torch_layouts.canonicalize(state, model))
    for height, width in [(224, 224), (182, 266), (518, 518)]:
        images = np.random.randn(2, height, width, 3).astype(np.float32)
        with torch.no_grad():
            tokens = tm.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        _compare(model.apply({"params": params}, jnp.asarray(images)), tokens, registers)
    # Export and strict-load into a fresh timm model.
    weights.export(model, params, str(tmp_path / "ours.safetensors"), "timm")
    from safetensors.torch import load_file
    fresh = timm.create_model(name, pretrained=False, depth=2, embed_dim=embed_dim, num_heads=4,
                              dynamic_img_size=True)
    fresh.load_state_dict(load_file(str(tmp_path / "ours.safetensors")), strict=True)
    for key, value in state.items():
        np.testing.assert_allclose(fresh.state_dict()[key].numpy(), value, atol=1e-7, err_msg=key)


def test_chunked_training_checkpoint_and_wrappers_import():
    model = vit.build_backbone("vit_small", embed_dim=32, depth=4, num_heads=2, img_size=56,
                               patch_size=14)
    hub = {k: np.random.randn(*s).astype(np.float32)
           for k, s in torch_layouts.expected_hub_shapes(model).items()}
    chunked = {}
    for key, value in hub.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = key.replace(f"blocks.{index}.", f"blocks.{index // 2}.{index}.", 1)
        chunked["module.backbone." + key] = value
    chunked["module.dino_head.mlp.0.weight"] = np.zeros((3, 32), np.float32)
    params = torch_layouts.hub_to_params(
        model, torch_layouts.canonicalize({"teacher": chunked}, model))
    back = torch_layouts.params_to_hub(model, params)
    for key in hub:
        np.testing.assert_array_equal(back[key], hub[key])


def test_mismatched_checkpoint_names_the_first_bad_key():
    small = vit.build_backbone("vits14", depth=2)
    hub = {k: np.zeros(s, np.float32) for k, s in torch_layouts.expected_hub_shapes(small).items()}
    with pytest.raises(ValueError, match=r"shape mismatch at 'cls_token'.*\(1, 1, 384\).*"
                                         r"\(1, 1, 768\)"):
        torch_layouts.hub_to_params(vit.build_backbone("vitb14", depth=2), hub)
    with pytest.raises(ValueError, match=r"missing key 'blocks.2.norm1.weight'"):
        torch_layouts.hub_to_params(vit.build_backbone("vits14", depth=3), hub)
    with pytest.raises(ValueError, match=r"unexpected key 'register_tokens'"):
        torch_layouts.hub_to_params(small, {**hub, "register_tokens": np.zeros((1, 4, 384))})


def test_training_workdir_loads_either_network(tmp_path):
    """A workdir as the trainer writes it (state + meta with the run's config): the workdir, its
    checkpoints dir and a step dir give the config's backbone and the saved teacher or student
    params, bit for bit; a bad path or network is a ConfigError naming it."""
    config = configs.smoke(configs.default_config())
    model = vit.backbone_from_config(config).clone(dtype=np.float32, drop_path_rate=0.0)
    saved = {network: {"backbone": random_params(model)} for network in weights.NETWORKS}
    run = tmp_path / "run"
    checkpointer = checkpoint.Checkpointer(str(run))
    checkpointer.save(6, {**saved, "step": np.int32(6)}, None,
                      {"config": config.to_json(), "step": 6})
    checkpointer.close()
    for path in (run, run / "checkpoints", run / "checkpoints" / "6"):
        for network in weights.NETWORKS:
            loaded_model, params = weights.load(str(path), network=network)
            assert weights.model_kwargs(loaded_model) == weights.model_kwargs(model)
            assert loaded_model.dtype == np.float32 and loaded_model.drop_path_rate == 0.0
            jax.tree.map(np.testing.assert_array_equal, params, saved[network]["backbone"])
    with pytest.raises(ConfigError, match="network must be one of"):
        weights.load(str(run), network="ema")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no dinov2_jax weights or checkpoint"):
        weights.load(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="do not exist"):
        weights.load(str(tmp_path / "missing"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dinov2_jax.convert", *args],
                          capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_round_trip_is_bit_identical(tmp_path):
    from dinov2.models.vision_transformer import vit_small
    official = _perturb(vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0))
    torch.save(official.state_dict(), tmp_path / "in.pth")
    result = _cli("--input", str(tmp_path / "in.pth"), "--arch", "vits14",
                  "--output", str(tmp_path / "jax"))
    assert result.returncode == 0, result.stderr
    assert json.load(open(tmp_path / "jax" / "model.json"))["embed_dim"] == 384
    result = _cli("--input", str(tmp_path / "jax"), "--output", str(tmp_path / "out.pth"),
                  "--format", "hub")
    assert result.returncode == 0, result.stderr
    assert "hub: features agree at every input size that is a multiple of 14" in result.stderr
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    fresh = vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
    fresh.load_state_dict(exported, strict=True)
    for key, value in official.state_dict().items():
        assert torch.equal(exported[key], value), key
    # In-process (one interpreter start less): a user error is a ConfigError, which cli.run
    # prints as one line; nothing is written.
    with pytest.raises(ConfigError, match="shape mismatch at 'cls_token'"):
        convert.main(["convert", "--input", str(tmp_path / "in.pth"), "--arch", "vitb14",
                      "--output", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def _exported_forward(target, model, params, tmp_path):
    """A function images -> (B, T, D) tokens of `model` exported to `target` and strictly
    loaded by that library (hub: the official DinoVisionTransformer; timm with
    dynamic_img_size; HF from_pretrained)."""
    registers = model.num_register_tokens
    if target == "hub":  # the PyPI dinov2 package: no registers, offset-0.1 resizing
        from dinov2.models.vision_transformer import DinoVisionTransformer
        net = DinoVisionTransformer(img_size=model.img_size, patch_size=14, embed_dim=64,
                                    depth=2, num_heads=4, init_values=1.0, block_chunks=0)
        weights.export(model, params, str(tmp_path / "hub.pth"), "hub")
        net.load_state_dict(torch.load(tmp_path / "hub.pth", weights_only=True), strict=True)

        def tokens(pixels):
            out = net.forward_features(pixels)
            return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1)
    elif target == "timm":
        from safetensors.torch import load_file
        net = timm.create_model(
            "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2",
            pretrained=False, img_size=model.img_size, depth=2, embed_dim=64, num_heads=4,
            dynamic_img_size=True)
        weights.export(model, params, str(tmp_path / "timm.safetensors"), "timm")
        net.load_state_dict(load_file(str(tmp_path / "timm.safetensors")), strict=True)
        tokens = net.forward_features
    else:
        weights.export(model, params, str(tmp_path / "hf"), "hf")
        cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
        net = cls.from_pretrained(str(tmp_path / "hf"))
        tokens = lambda pixels: net(pixel_values=pixels).last_hidden_state  # noqa: E731
    net.eval()

    def forward(images):
        with torch.no_grad():
            return tokens(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    return forward


# The official package on PyPI predates registers, so the hub's `_reg` constructors (by size,
# antialiased: `vit.EXPORT_INTERPOLATIONS`) are checked through HF's Dinov2WithRegistersModel,
# which resizes the same way, and timm.
@pytest.mark.parametrize("trained_as,target", [("default", "hub"), ("default", "timm"),
                                               ("default", "hf"), ("vits14_reg", "timm"),
                                               ("vits14_reg", "hf")])
def test_exports_agree_where_they_say_and_the_interpolation_option_reproduces_them(
        tmp_path, target, trained_as):
    """README, Weights (the table): a model's export to each target gives its features at the
    position table's own grid; elsewhere exactly when the target resizes the table the model's
    way, as `vit.export_agreement` says; and `--interpolation TARGET`
    (`vit.with_export_interpolation`) reproduces the exported model at every size. A model
    trained with the config defaults (offset 0.1, no registers) and one with the `_reg` hub
    settings. Tolerance 1e-4 max abs (fp32 summation order, as above); a disagreement is
    > 1e-3."""
    hub = vit.HUB_MODELS["vits14_reg"] if trained_as == "vits14_reg" else {}
    model = vit.DinoVisionTransformer(
        embed_dim=64, depth=2, num_heads=4, patch_size=14, img_size=112, layerscale=1.0,
        num_register_tokens=hub.get("num_register_tokens", 0),
        interpolate_offset=hub.get("interpolate_offset", configs.default_config().student
                                   .interpolate_offset),
        interpolate_antialias=hub.get("interpolate_antialias", False))
    params = random_params(model)
    forward = _exported_forward(target, model, params, tmp_path)
    everywhere = "every input size" in vit.export_agreement(model, target)
    registers = model.num_register_tokens
    matched = vit.with_export_interpolation(model, target)
    for height, width in [(112, 112), (84, 140), (154, 154)]:
        images = np.random.randn(2, height, width, 3).astype(np.float32)
        theirs = forward(images)
        ours = model.apply({"params": params}, jnp.asarray(images))
        gap = max(np.abs(np.asarray(ours["x_norm_clstoken"]) - theirs[:, 0]).max(),
                  np.abs(np.asarray(ours["x_norm_patchtokens"]) - theirs[:, 1 + registers:]).max())
        if everywhere or (height, width) == (112, 112):
            assert gap < 1e-4, (height, width, gap)
        else:
            assert gap > 1e-3, (height, width, gap)
        _compare(matched.apply({"params": params}, jnp.asarray(images)), theirs, registers)
    # The weights CLI path: load(..., interpolation=) is the same model.
    weights.save(str(tmp_path / "ours"), model, params)
    loaded, _ = weights.load(str(tmp_path / "ours"), interpolation=target)
    assert (loaded.interpolate_offset, loaded.interpolate_antialias) == (
        matched.interpolate_offset, matched.interpolate_antialias)
