"""The backbone's PyTorch state-dict layouts <-> the Flax param tree.

Every layout goes through the official hub key layout (`dinov2/models/vision_transformer.py`
state dicts as `torch.hub` loads them; flat `blocks.{i}.`), checked strictly against the
architecture: a missing, unexpected or mis-shaped key is an error that names it.
`canonicalize` reads the other layouts into it: training checkpoints (`teacher`/`student`/
`model` wrappers, `module.`/`backbone.` prefixes, chunked `blocks.{chunk}.{i}`), timm's
(`_convert_dinov2`: no mask token, registers folded into the cls token) and Hugging Face's
(`Dinov2Model`/`Dinov2WithRegistersModel`, split query/key/value). `hub_to_timm` and
`hub_to_hf` (+ `hf_config`) write them back. The layouts are in docs/reference.md, Export
layouts. Pure dict transforms of numpy arrays; file I/O is `dinov2_jax.weights`.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dinov2_jax.configs import ConfigError

# --------------------------------------------------------------------------------------------
# The official hub layout <-> the Flax param tree.

# (Flax path under `blocks`, hub suffix under `blocks.{i}.`, transform kind)
_BLOCK_KEYS = [
    ("norm1/scale", "norm1.weight", "copy"), ("norm1/bias", "norm1.bias", "copy"),
    ("attn/qkv/kernel", "attn.qkv.weight", "dense"), ("attn/qkv/bias", "attn.qkv.bias", "copy"),
    ("attn/proj/kernel", "attn.proj.weight", "dense"),
    ("attn/proj/bias", "attn.proj.bias", "copy"),
    ("ls1/gamma", "ls1.gamma", "copy"),
    ("norm2/scale", "norm2.weight", "copy"), ("norm2/bias", "norm2.bias", "copy"),
    ("ls2/gamma", "ls2.gamma", "copy"),
]
_FFN_KEYS = {
    "mlp": [("mlp/fc1/kernel", "mlp.fc1.weight", "dense"),
            ("mlp/fc1/bias", "mlp.fc1.bias", "copy"),
            ("mlp/fc2/kernel", "mlp.fc2.weight", "dense"),
            ("mlp/fc2/bias", "mlp.fc2.bias", "copy")],
    "swiglu": [("mlp/w12/kernel", "mlp.w12.weight", "dense"),
               ("mlp/w12/bias", "mlp.w12.bias", "copy"),
               ("mlp/w3/kernel", "mlp.w3.weight", "dense"), ("mlp/w3/bias", "mlp.w3.bias", "copy")],
}
_TOP_KEYS = [
    ("cls_token", "cls_token", "copy"), ("pos_embed", "pos_embed", "copy"),
    ("mask_token", "mask_token", "copy"), ("register_tokens", "register_tokens", "copy"),
    ("patch_embed/kernel", "patch_embed.proj.weight", "conv"),
    ("patch_embed/bias", "patch_embed.proj.bias", "copy"),
    ("norm/scale", "norm.weight", "copy"), ("norm/bias", "norm.bias", "copy"),
]
# How a Flax array becomes its torch tensor, and back: dense kernels are transposed, conv
# kernels go from HWIO to OIHW.
TO_TORCH = {"copy": lambda x: x, "dense": lambda x: x.T,
            "conv": lambda x: x.transpose(3, 2, 0, 1)}
FROM_TORCH = {"copy": lambda x: x, "dense": lambda x: x.T,
              "conv": lambda x: x.transpose(2, 3, 1, 0)}


def _layer_keys(model):
    block_keys = [k for k in _BLOCK_KEYS if model.layerscale or not k[0].startswith("ls")]
    return block_keys + _FFN_KEYS[model.ffn_layer]


def params_to_torch(params, top_keys, block_keys, depth):
    """Flax backbone params -> a torch state dict (numpy fp32) by key tables: `top_keys`
    (Flax path, torch key, kind) and `block_keys` (path under `blocks`, suffix under
    `blocks.{i}.`, kind) of a scanned stack of `depth` blocks."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {key: TO_TORCH[kind](np.asarray(flat[path], np.float32))
           for path, key, kind in top_keys}
    for path, suffix, kind in block_keys:
        stacked = np.asarray(flat["blocks/" + path], np.float32)
        for i in range(depth):
            out[f"blocks.{i}.{suffix}"] = TO_TORCH[kind](stacked[i])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def torch_to_params(state_dict, top_keys, block_keys, depth):
    """The inverse of `params_to_torch` (blocks stacked for the scan)."""
    flat = {path: FROM_TORCH[kind](np.asarray(state_dict[key], np.float32))
            for path, key, kind in top_keys}
    for path, suffix, kind in block_keys:
        flat["blocks/" + path] = np.stack([
            FROM_TORCH[kind](np.asarray(state_dict[f"blocks.{i}.{suffix}"], np.float32))
            for i in range(depth)])
    return traverse_util.unflatten_dict(flat, sep="/")


def layout_shapes(model, to_torch):
    """Key -> shape of the state dict `to_torch(model, params)` gives (eval_shape, no
    allocation)."""
    size = model.img_size
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    fake = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), shapes["params"])
    return {k: v.shape for k, v in to_torch(model, fake).items()}


def check_keys(state_dict, expected, architecture="the architecture", missing_hint=""):
    """Raises ConfigError naming the first missing, unexpected or mis-shaped key."""
    for key, shape in expected.items():
        if key not in state_dict:
            raise ConfigError(f"missing key {key!r} (expected shape {tuple(shape)}); the "
                              f"checkpoint does not match {architecture}{missing_hint}")
        got = tuple(np.shape(state_dict[key]))
        if got != tuple(shape):
            raise ConfigError(f"shape mismatch at {key!r}: checkpoint {got}, architecture "
                              f"{tuple(shape)}; wrong --arch?")
    for key in state_dict:
        if key not in expected:
            raise ConfigError(f"unexpected key {key!r} with shape "
                              f"{tuple(np.shape(state_dict[key]))}; the checkpoint does not "
                              f"match {architecture}")


def _top_keys(model, expected=None):
    return [k for k in _TOP_KEYS if (k[0] != "register_tokens" or model.num_register_tokens)
            and (expected is None or k[1] in expected)]


def params_to_hub(model, params):
    """Flax backbone params -> official hub state dict (numpy, fp32, flat `blocks.{i}`)."""
    return params_to_torch(params, _top_keys(model), _layer_keys(model), model.depth)


def hub_to_params(model, state_dict):
    """Official hub state dict -> Flax params, after a strict key and shape check."""
    expected = expected_hub_shapes(model)
    check_keys(state_dict, expected)
    return torch_to_params(state_dict, _top_keys(model, expected), _layer_keys(model),
                           model.depth)


def expected_hub_shapes(model):
    """Key -> shape of the official state dict of `model` (from eval_shape, no allocation)."""
    return layout_shapes(model, params_to_hub)


# --------------------------------------------------------------------------------------------
# Other layouts -> hub, and hub -> other layouts.


def canonicalize(state_dict, model):
    """Any supported torch layout -> the official hub layout (numpy arrays).

    Unwraps `teacher`/`student`/`model` training checkpoints (backbone only), strips `module.`
    and `backbone.` prefixes, flattens `blocks.{chunk}.{i}` and recognises timm and Hugging
    Face keys.
    """
    for wrapper in ("teacher", "student", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
    if any(k.startswith("embeddings.") for k in state_dict):
        return _hf_to_hub(state_dict, model)
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(module\.)?(backbone\.)?", "", key)
        if key.startswith(("dino_head.", "ibot_head.")):
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value
    if "mask_token" not in out and "norm.weight" in out:
        return _timm_to_hub(out, model)
    return out


def hub_to_timm(state_dict, model):
    """Hub -> timm's native layout (what `_convert_dinov2` produces)."""
    out = {}
    for key, value in state_dict.items():
        if key == "mask_token":
            continue
        out[key.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")] = value
    if model.num_register_tokens:
        out["cls_token"] = state_dict["cls_token"] + state_dict["pos_embed"][:, :1]
        out["pos_embed"] = np.ascontiguousarray(state_dict["pos_embed"][:, 1:])
        out["reg_token"] = out.pop("register_tokens")
    return out


def _timm_to_hub(state_dict, model):
    """timm -> hub. timm has no mask token (zeros here); reg4 models keep the folded cls."""
    out = {}
    for key, value in state_dict.items():
        if model.ffn_layer == "swiglu":
            key = key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        out["register_tokens" if key == "reg_token" else key] = value
    dim = out["cls_token"].shape[-1]
    out["mask_token"] = np.zeros((1, dim), np.float32)
    if "reg_token" in state_dict:
        zero_cls_pos = np.zeros((1, 1, dim), out["pos_embed"].dtype)
        out["pos_embed"] = np.concatenate([zero_cls_pos, out["pos_embed"]], axis=1)
    return out


_HF_BLOCK = [
    ("norm1", "norm1"), ("attn.proj", "attention.output.dense"),
    ("ls1.gamma", "layer_scale1.lambda1"),
    ("norm2", "norm2"), ("ls2.gamma", "layer_scale2.lambda1"), ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"), ("mlp.w12", "mlp.weights_in"), ("mlp.w3", "mlp.weights_out"),
]
_HF_TOP = [
    ("cls_token", "embeddings.cls_token"), ("mask_token", "embeddings.mask_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("register_tokens", "embeddings.register_tokens"),
    ("patch_embed.proj", "embeddings.patch_embeddings.projection"), ("norm", "layernorm"),
]


def _rename(key, pairs, reverse=False):
    for hub, hf in pairs:
        src, dst = (hf, hub) if reverse else (hub, hf)
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def hub_to_hf(state_dict, model):
    """Hub -> Hugging Face on-disk names (split query/key/value)."""
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        if not match:
            out[_rename(key, _HF_TOP)] = value
            continue
        prefix, rest = f"encoder.layer.{match[1]}.", match[2]
        if rest.startswith("attn.qkv."):
            for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
                out[prefix + f"attention.attention.{name}.{rest.split('.')[-1]}"] = part
        else:
            out[prefix + _rename(rest, _HF_BLOCK)] = value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _hf_to_hub(state_dict, model):
    out, qkv = {}, {}
    for key, value in state_dict.items():
        match = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        if not match:
            hub_key = _rename(key, _HF_TOP, reverse=True)
            if hub_key is None:
                raise ConfigError(f"unexpected Hugging Face key {key!r}")
            out[hub_key] = value
            continue
        layer, rest = match[1], match[2]
        attention = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if attention:
            qkv.setdefault((layer, attention[2]), {})[attention[1]] = value
            continue
        hub_rest = _rename(rest, _HF_BLOCK, reverse=True)
        if hub_rest is None:
            raise ConfigError(f"unexpected Hugging Face key {key!r}")
        out[f"blocks.{layer}.{hub_rest}"] = value
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0)
    return out


def hf_config(model):
    """config.json for `Dinov2Model` / `Dinov2WithRegistersModel.from_pretrained`."""
    registers = model.num_register_tokens
    config = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": model.embed_dim, "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads, "mlp_ratio": int(model.mlp_ratio),
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": model.img_size,
        "patch_size": model.patch_size, "num_channels": 3, "qkv_bias": True,
        "layerscale_value": 1.0, "drop_path_rate": 0.0,
        "use_swiglu_ffn": model.ffn_layer == "swiglu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
    }
    if registers:
        config["num_register_tokens"] = registers
    return config
