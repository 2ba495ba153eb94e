"""The PyTorch state-dict layouts of DINOv3 backbones (RoPE models) <-> the Flax param tree.

The same interface as `torch_layouts` (which holds the DINOv2 layouts), for models with
`pos_embed="rope"`. Every layout goes through the official hub layout of
`dinov3/models/vision_transformer.py` (`dinov3/hub/backbones.py` loads it strictly):
`cls_token`, `storage_tokens`, `mask_token` [1, D], `patch_embed.proj.*`, the buffers
`rope_embed.periods` [D_h/4] and `blocks.{i}.attn.qkv.bias_mask` [3D] (mask_k_bias), flat
`blocks.{i}.*` with `ls1.gamma`, `mlp.fc1/fc2` or `mlp.w1/w2/w3`, `norm.*`, and
`local_cls_norm.*` when untied. `canonicalize` also reads timm's (`timm/models/eva.py`,
`vit_*_patch16_dinov3[_qkvb]`) and Hugging Face's (`DINOv3ViTModel`, on-disk `layer.{i}.` or
in-memory `model.layer.{i}.`) layouts; `hub_to_timm`, `hub_to_hf` and `hf_config` write them.

Quirks of the targets, and what the conversion does about them:
- Released hub files store `rope_embed.periods` rounded to bfloat16 (they were trained with
  bf16 RoPE), and the hub model uses those values. timm and HF recompute them in float32.
  `model_for_periods` reads the file's periods: the float32 ones keep the model as it is,
  bf16-rounded ones set `rope_periods_dtype="bfloat16"`, anything else is an error.
- timm and HF have no K bias (it is masked to 0) and drop the buffers, the mask token and
  `local_cls_norm`. timm's non-`_qkvb` models have no q/v bias either (timm: the distilled
  B/L/H+ biases are all zero). Read from them, the missing biases are zeros, the mask token
  is zeros and `local_cls_norm` (used only for local crops in training) copies `norm`.
  `hub_to_timm` writes `q_bias`/`v_bias` (the `*_dinov3_qkvb` models) unless every q and v
  bias is exactly 0, then none (the plain `*_dinov3` models), so both load strictly.
"""
import re

import numpy as np

from dinov2_jax.configs import ConfigError
from dinov2_jax.models import torch_layouts, vit

_NORM = lambda path, key: [(f"{path}/scale", f"{key}.weight", "copy"),
                           (f"{path}/bias", f"{key}.bias", "copy")]
_DENSE = lambda path, key: [(f"{path}/kernel", f"{key}.weight", "dense"),
                            (f"{path}/bias", f"{key}.bias", "copy")]


def _top_keys(model):
    keys = [("cls_token", "cls_token", "copy")]
    if model.num_register_tokens:
        keys.append(("register_tokens", "storage_tokens", "copy"))
    keys += [("mask_token", "mask_token", "copy"),
             ("patch_embed/kernel", "patch_embed.proj.weight", "conv"),
             ("patch_embed/bias", "patch_embed.proj.bias", "copy")]
    keys += _NORM("norm", "norm")
    if model.untie_local_cls_norm:
        keys += _NORM("local_cls_norm", "local_cls_norm")
    return keys


def _block_keys(model):
    keys = _NORM("norm1", "norm1") + [("attn/qkv/kernel", "attn.qkv.weight", "dense")]
    if model.qkv_bias:
        keys.append(("attn/qkv/bias", "attn.qkv.bias", "copy"))
    keys += _DENSE("attn/proj", "attn.proj")
    if model.layerscale:
        keys += [("ls1/gamma", "ls1.gamma", "copy"), ("ls2/gamma", "ls2.gamma", "copy")]
    keys += _NORM("norm2", "norm2")
    names = (("w1", "w2", "w3") if model.swiglu_unpacked else
             ("w12", "w3") if model.ffn_layer == "swiglu" else ("fc1", "fc2"))
    for name in names:
        keys += _DENSE(f"mlp/{name}", f"mlp.{name}")
    return keys


def _bias_mask(dim):
    mask = np.ones(3 * dim, np.float32)
    mask[dim:2 * dim] = 0
    return mask


def _buffers(model):
    """The hub's persistent buffers of `model`: RoPE periods and the K-bias masks."""
    out = {"rope_embed.periods": model.rope_settings().periods()}
    if model.qkv_bias and model.mask_k_bias:
        for i in range(model.depth):
            out[f"blocks.{i}.attn.qkv.bias_mask"] = _bias_mask(model.embed_dim)
    return out


def params_to_hub(model, params):
    """Flax backbone params -> official DINOv3 hub state dict (numpy, fp32, with buffers)."""
    out = torch_layouts.params_to_torch(params, _top_keys(model), _block_keys(model),
                                        model.depth)
    return {**out, **_buffers(model)}


def expected_hub_shapes(model):
    """Key -> shape of the official DINOv3 state dict of `model` (eval_shape, no allocation)."""
    return torch_layouts.layout_shapes(model, params_to_hub)


def check_state_dict(state_dict, expected):
    """Raises ConfigError naming the first missing, unexpected or mis-shaped key."""
    hint = (" (a DINOv2 checkpoint: it has a learned pos_embed; use a DINOv2 arch)"
            if "pos_embed" in state_dict else "")
    torch_layouts.check_keys(state_dict, expected, "the DINOv3 architecture", hint)


def model_for_periods(model, state_dict):
    """`model` with the RoPE periods of the file: float32 or bfloat16-rounded (see above)."""
    periods = np.asarray(state_dict.get("rope_embed.periods", model.rope_settings().periods()),
                         np.float32)
    for dtype in ("float32", "bfloat16"):
        candidate = model.clone(rope_periods_dtype=dtype)
        ours = candidate.rope_settings().periods()
        if periods.shape == ours.shape and np.allclose(periods, ours, rtol=1e-6, atol=0):
            return candidate
    raise ConfigError(f"rope_embed.periods {periods.tolist()} are not the periods of the "
                      f"architecture (base {model.rope_base}, head dim "
                      f"{model.embed_dim // model.num_heads}); wrong --arch?")


def hub_to_params(model, state_dict):
    """Official DINOv3 hub state dict -> Flax params, after a strict key and shape check.

    The buffers must hold the values `model` computes (periods via `model_for_periods`).
    """
    check_state_dict(state_dict, expected_hub_shapes(model))
    for key, value in _buffers(model).items():
        if not np.allclose(np.asarray(state_dict[key], np.float32), value, rtol=1e-6, atol=0):
            raise ConfigError(f"buffer {key!r} holds {np.asarray(state_dict[key]).ravel()[:6]}"
                              f"..., not the architecture's {value.ravel()[:6]}...")
    return torch_layouts.torch_to_params(state_dict, _top_keys(model), _block_keys(model),
                                         model.depth)


# --------------------------------------------------------------------------------------------
# Other layouts -> hub, and hub -> other layouts.


def _fill_missing(out, model):
    """What timm and HF files lack: buffers, mask token, K (and q/v) bias, local_cls_norm."""
    dim = model.embed_dim
    out.update(_buffers(model))
    out.setdefault("mask_token", np.zeros((1, dim), np.float32))
    for i in range(model.depth):
        if model.qkv_bias:
            out.setdefault(f"blocks.{i}.attn.qkv.bias", np.zeros(3 * dim, np.float32))
    if model.untie_local_cls_norm:
        out.setdefault("local_cls_norm.weight", out["norm.weight"])
        out.setdefault("local_cls_norm.bias", out["norm.bias"])
    return out


def canonicalize(state_dict, model):
    """Any supported DINOv3 torch layout -> the official hub layout (numpy arrays).

    Unwraps `teacher`/`student`/`model` training checkpoints (backbone only) and strips
    `module.`/`backbone.` prefixes; recognises timm (`reg_token`, `gamma_1`) and Hugging Face
    (`embeddings.patch_embeddings.weight`) keys.
    """
    for wrapper in ("teacher", "student", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
    if "embeddings.patch_embeddings.weight" in state_dict:
        return _hf_to_hub(state_dict, model)
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(module\.)?(backbone\.)?", "", key)
        if not key.startswith(("dino_head.", "ibot_head.")):
            out[key] = value
    if "reg_token" in out or "blocks.0.gamma_1" in out:
        return _timm_to_hub(out, model)
    return out


_DROPPED = ("rope_embed.periods", "local_cls_norm.weight", "local_cls_norm.bias")


def _timm_renames(model):
    renames = [("storage_tokens", "reg_token"), ("ls1.gamma", "gamma_1"),
               ("ls2.gamma", "gamma_2")]
    if model.swiglu_unpacked:
        renames += [("mlp.w1.", "mlp.fc1_g."), ("mlp.w2.", "mlp.fc1_x."), ("mlp.w3.", "mlp.fc2.")]
    return renames


def _check_representable(model, target):
    if model.ffn_layer == "swiglu" and not model.swiglu_unpacked:
        raise ConfigError(f"{target} has no packed SwiGLU (w12) for DINOv3 models; use "
                          "student.swiglu_unpacked")
    if not model.layerscale:
        raise ConfigError(f"{target}'s DINOv3 models always have LayerScale")


def hub_to_timm(state_dict, model):
    """Hub -> timm's native Eva layout (what its `checkpoint_filter_fn` makes of a hub file)."""
    _check_representable(model, "timm")
    dim = model.embed_dim
    zero_qv = all(not np.any(v[:dim]) and not np.any(v[2 * dim:])
                  for k, v in state_dict.items() if k.endswith("attn.qkv.bias"))
    out = {}
    for key, value in state_dict.items():
        if key in _DROPPED or key == "mask_token" or key.endswith(".bias_mask"):
            continue
        if key.endswith("attn.qkv.bias"):
            if zero_qv:
                continue
            q, _, v = np.split(value, 3)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
            continue
        for hub, timm in _timm_renames(model):
            key = key.replace(hub, timm)
        out[key] = value
    return out


def _timm_to_hub(state_dict, model):
    out, biases = {}, {}
    for key, value in state_dict.items():
        match = re.match(r"(blocks\.\d+\.attn\.)(q|v)_bias$", key)
        if match:
            biases.setdefault(match[1], {})[match[2]] = value
            continue
        for hub, timm in _timm_renames(model):
            key = key.replace(timm, hub)
        out[key] = value
    for prefix, qv in biases.items():
        out[prefix + "qkv.bias"] = np.concatenate([qv["q"], np.zeros_like(qv["q"]), qv["v"]])
    return _fill_missing(out, model)


_HF_BLOCK = [("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj"),
             ("ls1.gamma", "layer_scale1.lambda1"), ("ls2.gamma", "layer_scale2.lambda1"),
             ("mlp.fc1", "mlp.up_proj"), ("mlp.fc2", "mlp.down_proj"),
             ("mlp.w1", "mlp.gate_proj"), ("mlp.w2", "mlp.up_proj"), ("mlp.w3", "mlp.down_proj")]
_HF_TOP = [("cls_token", "embeddings.cls_token"), ("mask_token", "embeddings.mask_token"),
           ("storage_tokens", "embeddings.register_tokens"),
           ("patch_embed.proj", "embeddings.patch_embeddings"), ("norm", "norm")]


def _rename(key, pairs, reverse=False):
    for hub, hf in pairs:
        src, dst = (hf, hub) if reverse else (hub, hf)
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def _hf_block_pairs(model):
    mlp = ("mlp.w1", "mlp.w2", "mlp.w3") if model.swiglu_unpacked else ("mlp.fc1", "mlp.fc2")
    return [(hub, hf) for hub, hf in _HF_BLOCK if not hub.startswith("mlp.") or hub in mlp]


def hub_to_hf(state_dict, model):
    """Hub -> Hugging Face `DINOv3ViTModel` on-disk names (split q/k/v projections)."""
    _check_representable(model, "Hugging Face DINOv3ViTModel")
    out = {}
    for key, value in state_dict.items():
        if key in _DROPPED or key.endswith(".bias_mask"):
            continue
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        if not match:
            value = value.reshape(1, 1, -1) if key == "mask_token" else value
            out[_rename(key, _HF_TOP)] = value
            continue
        prefix, rest = f"layer.{match[1]}.", match[2]
        if rest.startswith("attn.qkv."):
            kind = rest.split(".")[-1]
            for name, part in zip("qkv", np.split(value, 3, axis=0)):
                if kind == "weight" or name != "k" or not model.mask_k_bias:
                    out[prefix + f"attention.{name}_proj.{kind}"] = part
        else:
            out[prefix + _rename(rest, _hf_block_pairs(model))] = value
    if not model.num_register_tokens:
        out["embeddings.register_tokens"] = np.zeros((1, 0, model.embed_dim), np.float32)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _hf_to_hub(state_dict, model):
    out, qkv = {}, {}
    pairs = _hf_block_pairs(model)
    for key, value in state_dict.items():
        key = re.sub(r"^model\.layer\.", "layer.", key)
        match = re.match(r"layer\.(\d+)\.(.*)", key)
        if not match:
            hub_key = _rename(key, _HF_TOP, reverse=True)
            if hub_key is None:
                raise ConfigError(f"unexpected Hugging Face DINOv3 key {key!r}")
            if hub_key == "storage_tokens" and not model.num_register_tokens:
                continue
            out[hub_key] = value.reshape(1, -1) if hub_key == "mask_token" else value
            continue
        layer, rest = match[1], match[2]
        attention = re.match(r"attention\.(q|k|v)_proj\.(weight|bias)$", rest)
        if attention:
            qkv.setdefault((layer, attention[2]), {})[attention[1]] = value
            continue
        hub_rest = _rename(rest, pairs, reverse=True)
        if hub_rest is None:
            raise ConfigError(f"unexpected Hugging Face DINOv3 key {key!r}")
        out[f"blocks.{layer}.{hub_rest}"] = value
    for (layer, kind), parts in qkv.items():
        if kind == "bias":
            parts.setdefault("k", np.zeros_like(parts["q"]))
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(
            [parts["q"], parts["k"], parts["v"]], axis=0)
    return _fill_missing(out, model)


def hf_config(model):
    """config.json for `DINOv3ViTModel.from_pretrained` (transformers >= 4.56)."""
    if model.rope_normalize != "separate" or model.rope_base is None:
        raise ConfigError("Hugging Face DINOv3ViTModel supports RoPE with a base and "
                          "'separate' coordinate normalisation only")
    gated = model.ffn_layer == "swiglu"
    return {
        "architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit",
        "hidden_size": model.embed_dim, "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": vit.ffn_hidden_dim(model.embed_dim, model.mlp_ratio,
                                                model.ffn_layer, model.ffn_align),
        "hidden_act": "silu" if gated else "gelu", "use_gated_mlp": gated,
        "layer_norm_eps": model.layernorm_eps, "rope_theta": model.rope_base,
        "image_size": model.img_size, "patch_size": model.patch_size, "num_channels": 3,
        "query_bias": model.qkv_bias, "value_bias": model.qkv_bias,
        "key_bias": model.qkv_bias and not model.mask_k_bias, "proj_bias": True,
        "mlp_bias": True, "layerscale_value": model.layerscale or 1.0,
        "num_register_tokens": model.num_register_tokens, "pos_embed_shift": model.rope_shift,
        "pos_embed_jitter": model.rope_jitter, "pos_embed_rescale": model.rope_rescale,
        "drop_path_rate": 0.0, "initializer_range": 0.02,
    }
