"""DINOv3 weights in and out: official hub, timm (`vit_*_patch16_dinov3[_qkvb]`) and Hugging Face
(`DINOv3ViTModel`) layouts, against the real timm and transformers models.

The official dinov3 code is not on PyPI, so the official forward is timm's and HF's (both
built with random weights, offline) and the official layout is checked by the key count of the
hub's ViT-S/16 (188 tensors) and by timm's own `checkpoint_filter_fn`, which reads hub files
(it drops `rope_embed.periods`, `bias_mask`, `mask_token`, renames `storage_tokens` and
`ls*.gamma`, splits `qkv.bias`), followed by a strict load. Every parameter is perturbed so
that biases, norms, tokens and LayerScale are all exercised.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from dinov2_jax import weights  # noqa: E402
from dinov2_jax.configs import ConfigError  # noqa: E402
from dinov2_jax.eval import features  # noqa: E402
from dinov2_jax.models import dinov3_layouts, torch_layouts, vit  # noqa: E402

# fp32 on both sides, 12 blocks of the same math in another summation order (XLA vs torch
# CPU kernels): observed max |diff| 5e-6 (S) to 1.5e-5 (S+) on tokens of magnitude ~5.
ATOL = 1e-4
SIZES = [(224, 224), (160, 240)]  # square, and non-square (10 x 15 patches)


def _perturbed(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def _timm(name, **kwargs):
    return _perturbed(timm.create_model(name, pretrained=False, num_classes=0, **kwargs))


def _numpy(state_dict):
    return {k: v.detach().numpy().copy() for k, v in state_dict.items()}


def _tokens(model, params, images):
    """cls, storage and patch tokens of our forward (NHWC input), one (B, T, D) array."""
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(
        images.transpose(0, 2, 3, 1)))
    return np.concatenate([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"],
                           out["x_norm_patchtokens"]], axis=1)


def _torch_forward(fn, images):
    with torch.no_grad():
        return fn(torch.from_numpy(images)).numpy()


def _same_params(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


# ViT-S/16 whole, through weights.load; ViT-S+/16 (SwiGLU) with 4 of its 12 blocks, to keep the
# test fast: every kind of key and shape is in the first blocks.
@pytest.mark.parametrize("timm_name, arch, depth, n_keys", [
    ("vit_small_patch16_dinov3_qkvb", "dinov3_vits16", 12, 188),
    ("vit_small_plus_patch16_dinov3", "dinov3_vits16plus", 4, 8 + 4 * 17),
])
def test_timm_dinov3_in_and_out_with_equal_features(tmp_path, timm_name, arch, depth, n_keys):
    reference = _timm(timm_name, depth=depth)
    path = tmp_path / "timm.safetensors"
    weights.write_torch_file(_numpy(reference.state_dict()), path)
    if depth == 12:
        model, params = weights.load(path, arch)
    else:
        model, params = weights.from_state_dict(weights.read_torch_file(path),
                                                vit.build_backbone(arch, depth=depth))
    assert model.rope_periods_dtype == "float32"  # timm computes float32 periods
    for height, width in SIZES:
        images = np.float32(np.random.randn(1, 3, height, width))
        ours = _tokens(model, params, images)
        np.testing.assert_allclose(ours, _torch_forward(reference.forward_features, images),
                                   atol=ATOL)

    # timm: a strict load gives back timm's own tensors
    weights.export(model, params, tmp_path / "out_timm.pth", "timm")
    fresh = timm.create_model(timm_name, pretrained=False, num_classes=0, depth=depth)
    fresh.load_state_dict(torch.load(tmp_path / "out_timm.pth"), strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    # official hub layout: the key count of the hub model, read by timm's hub-file filter
    weights.export(model, params, tmp_path / "hub.pth", "hub")
    hub = torch.load(tmp_path / "hub.pth")
    assert len(hub) == n_keys and "storage_tokens" in hub and "pos_embed" not in hub
    assert hub["rope_embed.periods"].shape == (16,)
    assert torch.equal(hub["blocks.0.attn.qkv.bias_mask"][384:768], torch.zeros(384))
    from_hub = timm.create_model(timm_name, pretrained=False, num_classes=0, depth=depth)
    from_hub.load_state_dict(timm.models.eva.checkpoint_filter_fn(hub, from_hub), strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(from_hub.state_dict()[key], value), key

    # round trip through the hub file: bit-identical
    _, again = weights.from_state_dict(weights.read_torch_file(tmp_path / "hub.pth"), model)
    assert _same_params(params, again)


@pytest.mark.parametrize("arch, depth, gated", [("dinov3_vits16", 12, False),
                                                ("dinov3_vits16plus", 4, True)])
def test_hf_dinov3_in_and_out_with_equal_features(tmp_path, arch, depth, gated):
    config = transformers.DINOv3ViTConfig(
        hidden_size=384, num_hidden_layers=depth, num_attention_heads=6,
        intermediate_size=1536, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
        num_register_tokens=4, layerscale_value=1e-5, layer_norm_eps=1e-5)
    reference = _perturbed(transformers.DINOv3ViTModel(config))
    reference.save_pretrained(tmp_path / "hf_in")
    model, params = weights.from_state_dict(
        weights.read_torch_file(tmp_path / "hf_in" / "model.safetensors"),
        vit.build_backbone(arch, depth=depth))
    forward = lambda x: reference(pixel_values=x).last_hidden_state
    for height, width in SIZES:
        images = np.float32(np.random.randn(1, 3, height, width))
        np.testing.assert_allclose(_tokens(model, params, images),
                                   _torch_forward(forward, images), atol=ATOL)
    # the in-memory names of transformers 5 (model.layer.N) read the same
    in_memory = dinov3_layouts.canonicalize(_numpy(reference.state_dict()), model)
    assert _same_params(params, dinov3_layouts.hub_to_params(model, in_memory))

    weights.export(model, params, tmp_path / "hf_out", "hf")
    loaded, info = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf_out",
                                                               output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    exported_config = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    assert exported_config["layer_norm_eps"] == 1e-5 and exported_config["key_bias"] is False
    _, again = weights.from_state_dict(
        weights.read_torch_file(tmp_path / "hf_out" / "model.safetensors"), model)
    assert _same_params(params, again)


def test_hub_files_with_bfloat16_periods_keep_them(tmp_path):
    """Released hub files hold bf16-rounded RoPE periods and the hub model uses them; timm and
    HF recompute float32 ones. The import keeps the file's, so features follow the hub model."""
    reference = _timm("vit_small_patch16_dinov3_qkvb", depth=2)
    model = vit.build_backbone("dinov3_vits16", depth=2)
    state = dinov3_layouts.canonicalize(_numpy(reference.state_dict()), model)
    rounded = np.asarray(torch.from_numpy(state["rope_embed.periods"]).bfloat16().float())
    state["rope_embed.periods"] = rounded
    weights.write_torch_file(state, tmp_path / "hub_bf16.pth")
    model, params = weights.from_state_dict(weights.read_torch_file(tmp_path / "hub_bf16.pth"),
                                            model)
    assert model.rope_periods_dtype == "bfloat16"
    images = np.float32(np.random.randn(2, 3, 64, 96))
    ours = _tokens(model, params, images)
    float32_periods = _torch_forward(reference.forward_features, images)
    with torch.no_grad():
        reference.rope.periods.copy_(torch.from_numpy(rounded))
    np.testing.assert_allclose(ours, _torch_forward(reference.forward_features, images),
                               atol=ATOL)
    # the rounding moves the features measurably (observed 2.7e-3 to 3.3e-3 here, 1.1e-3 on
    # the whole ViT-S at 224 px), far above the parity error (~5e-6)
    assert np.abs(ours - float32_periods).max() > 5 * ATOL
    weights.export(model, params, tmp_path / "again.pth", "hub")
    assert torch.equal(torch.load(tmp_path / "again.pth")["rope_embed.periods"],
                       torch.from_numpy(rounded))
    state["rope_embed.periods"] = rounded * 1.01
    with pytest.raises(ConfigError, match="rope_embed.periods .* are not the periods"):
        dinov3_layouts.model_for_periods(model, state)


def test_dinov2_and_dinov3_files_with_the_other_arch_fail_naming_the_key(tmp_path):
    v3 = vit.build_backbone("dinov3_vits16", depth=1)
    v3_state = dinov3_layouts.params_to_hub(v3, _random_params(v3))
    weights.write_torch_file(v3_state, tmp_path / "v3.safetensors")
    with pytest.raises(ConfigError, match=r"missing key 'pos_embed' \(expected shape "
                                          r"\(1, 1370, 384\)\)"):
        weights.load(tmp_path / "v3.safetensors", "vits14")
    v2 = vit.build_backbone("vits14_reg", depth=1)
    weights.write_torch_file(torch_layouts.params_to_hub(v2, _random_params(v2)),
                             tmp_path / "v2.safetensors")
    with pytest.raises(ConfigError, match=r"missing key 'storage_tokens' \(expected shape "
                                          r"\(1, 4, 384\)\).*DINOv2 checkpoint"):
        weights.load(tmp_path / "v2.safetensors", "dinov3_vits16")
    v3_state["blocks.0.attn.qkv.weight"] = v3_state["blocks.0.attn.qkv.weight"][:, :100]
    with pytest.raises(ConfigError, match=r"shape mismatch at 'blocks.0.attn.qkv.weight': "
                                          r"checkpoint \(1152, 100\), architecture \(1152, 384\)"):
        dinov3_layouts.hub_to_params(v3, v3_state)


def _random_params(model):
    """Random parameters from the shapes (no init): 0.05-scale noise, norms and LayerScale
    around 1, so that activations stay O(1) through the blocks (std-1 kernels grew tokens to
    ~1e3, where float32 rounding alone exceeds the absolute tolerance)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))

    def draw(path, shape):
        noise = np.float32(0.05 * np.random.randn(*shape.shape))
        return noise + 1 if jax.tree_util.keystr(path).endswith(("'scale']", "'gamma']")) else noise

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def test_vit7b_layout_untied_local_norm_no_qkv_bias_through_timm_and_hf(tmp_path):
    """The 7B's layout (no qkv bias, no bias_mask, local_cls_norm, SwiGLU aligned to 64) at a
    tiny width: timm's vit_7b_patch16_dinov3 and HF load it strictly and compute the same."""
    sizes = dict(depth=2, embed_dim=128, num_heads=2)
    model = vit.build_backbone("dinov3_vit7b16", **sizes)
    params = _random_params(model)
    weights.export(model, params, tmp_path / "hub.pth", "hub")
    hub = torch.load(tmp_path / "hub.pth")
    assert "local_cls_norm.weight" in hub and "blocks.0.attn.qkv.bias" not in hub
    assert not any(k.endswith("bias_mask") for k in hub)
    assert hub["blocks.0.mlp.w1.weight"].shape == (256, 128)  # int(384 * 2 / 3) = 256, on 64
    reference = timm.create_model("vit_7b_patch16_dinov3", pretrained=False, num_classes=0,
                                  **sizes).eval()
    reference.load_state_dict(timm.models.eva.checkpoint_filter_fn(hub, reference), strict=True)
    images = np.float32(np.random.randn(1, 3, 48, 64))
    ours = _tokens(model, params, images)
    np.testing.assert_allclose(ours, _torch_forward(reference.forward_features, images),
                               atol=ATOL)
    weights.export(model, params, tmp_path / "hf", "hf")
    hf, info = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf",
                                                           output_loading_info=True)
    assert not any(info.values()), info
    np.testing.assert_allclose(
        ours, _torch_forward(lambda x: hf(pixel_values=x).last_hidden_state, images), atol=ATOL)
    # timm and HF drop local_cls_norm (training only) and the mask token; read back, they
    # are the final norm's copy and zeros, everything else bit-identical
    weights.export(model, params, tmp_path / "timm.pth", "timm")
    _, back = weights.from_state_dict(weights.read_torch_file(tmp_path / "timm.pth"), model)
    assert _same_params(back["local_cls_norm"], params["norm"])
    assert not np.any(back["mask_token"])
    dropped = ("local_cls_norm", "mask_token")
    assert _same_params({k: v for k, v in back.items() if k not in dropped},
                        {k: v for k, v in params.items() if k not in dropped})


def test_features_cli_writes_dinov3_cls_storage_and_patch_tokens(tmp_path):
    reference = _timm("vit_small_patch16_dinov3_qkvb")
    weights.write_torch_file(_numpy(reference.state_dict()), tmp_path / "timm.safetensors")
    images = np.float32(np.random.randn(3, 3, 48, 80))
    np.save(tmp_path / "images.npy", images.transpose(0, 2, 3, 1).copy())
    features.main(["features", f"--weights={tmp_path / 'timm.safetensors'}",
                   "--arch=dinov3_vits16", f"--input={tmp_path / 'images.npy'}",
                   f"--output={tmp_path / 'feats.npz'}", "--batch_size=2"])
    saved = np.load(tmp_path / "feats.npz")
    ref = _torch_forward(reference.forward_features, images)
    np.testing.assert_allclose(saved["cls"], ref[:, 0], atol=ATOL)
    np.testing.assert_allclose(saved["reg"], ref[:, 1:5], atol=ATOL)
    np.testing.assert_allclose(saved["patch"], ref[:, 5:], atol=ATOL)
