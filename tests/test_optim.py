"""dinov2_jax.train.optim: parameter groups (spec §11.4) and steps against torch.optim.AdamW
driven like the reference (its param-group functions, per-module clip_grad_norm_)."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
param_groups_ref = pytest.importorskip("dinov2.utils.param_groups")
utils = pytest.importorskip("dinov2.utils.utils")

from dinov2_jax import configs  # noqa: E402
from dinov2_jax.train import optim, schedules  # noqa: E402


def _head(dim, hidden=6, bottleneck=5, prototypes=7):
    return {"mlp_0": {"kernel": (dim, hidden), "bias": (hidden,)},
            "mlp_1": {"kernel": (hidden, hidden), "bias": (hidden,)},
            "mlp_2": {"kernel": (hidden, bottleneck), "bias": (bottleneck,)},
            "last_layer": {"weight_v": (bottleneck, prototypes), "weight_g": (prototypes,)}}


def _student_shapes(depth, dim=4, patch=2, registers=0, ibot_head=True):
    """Leaf shapes of the student param tree with the names of HELPERS.md."""
    dense = lambda i, o: {"kernel": (depth, i, o), "bias": (depth, o)}
    norm = lambda *lead: {"scale": lead + (dim,), "bias": lead + (dim,)}
    backbone = {
        "patch_embed": {"kernel": (patch, patch, 3, dim), "bias": (dim,)},
        "cls_token": (1, 1, dim), "pos_embed": (1, 5, dim), "mask_token": (1, dim),
        "blocks": {"norm1": norm(depth), "attn": {"qkv": dense(dim, 3 * dim),
                                                  "proj": dense(dim, dim)},
                   "ls1": {"gamma": (depth, dim)}, "norm2": norm(depth),
                   "mlp": {"fc1": dense(dim, 2 * dim), "fc2": dense(2 * dim, dim)},
                   "ls2": {"gamma": (depth, dim)}},
        "norm": norm(),
    }
    if registers:
        backbone["register_tokens"] = (1, registers, dim)
    student = {"backbone": backbone, "dino_head": _head(dim)}
    if ibot_head:
        student["ibot_head"] = _head(dim)
    return jax.tree.map(np.zeros, student, is_leaf=lambda x: isinstance(x, tuple))


def _torch_name(path, layer=None):
    """Our leaf path -> the reference's parameter name inside its sub-module."""
    parts = [str(k.key) for k in path[1:]]
    renames = {"kernel": "weight", "scale": "weight"}
    parts[-1] = renames.get(parts[-1], parts[-1])
    parts = [f"mlp.{2 * int(p[4:])}" if re.fullmatch(r"mlp_\d", p) else p for p in parts]
    if parts[0] == "patch_embed":
        parts.insert(1, "proj")
    if parts[0] == "blocks":
        parts.insert(1, str(layer))
    return ".".join(parts)


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def _named_slices(params):
    """[(module, torch name, leaf path, layer index or None)] for every torch parameter."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        module = path[0].key
        layers = range(leaf.shape[0]) if str(path[1].key) == "blocks" else [None]
        out += [(module, _torch_name(path, i), path, i) for i in layers]
    return out


def test_names_match_the_reference_modules():
    from dinov2.layers import DINOHead
    from dinov2.models.vision_transformer import DinoVisionTransformer
    vit = DinoVisionTransformer(img_size=4, patch_size=2, embed_dim=4, depth=2, num_heads=2,
                                mlp_ratio=2, init_values=1e-5, block_chunks=0)
    head = DINOHead(in_dim=4, out_dim=7, hidden_dim=6, bottleneck_dim=5, nlayers=3)
    names = {(m, n) for m, n, _, _ in _named_slices(_student_shapes(depth=2))}
    expected = ({("backbone", n) for n, _ in vit.named_parameters()}
                | {(m, n) for m in ("dino_head", "ibot_head") for n, _ in head.named_parameters()})
    assert names == expected


SPEC_11_4 = {  # leaf: (lr multiplier, wd multiplier); ViT-L depth 24, rho 0.9, patch mult 0.2
    "backbone.cls_token": (0.0717897988, 1.0), "backbone.pos_embed": (0.0717897988, 1.0),
    "backbone.mask_token": (0.0717897988, 1.0), "backbone.register_tokens": (0.0717897988, 1.0),
    "backbone.patch_embed.kernel": (0.0143579598, 1.0),
    "backbone.patch_embed.bias": (0.0143579598, 0.0),
    "backbone.blocks.norm1.scale[0]": (0.0797664431, 0.0),
    "backbone.blocks.attn.qkv.bias[0]": (0.0797664431, 0.0),
    "backbone.blocks.ls1.gamma[0]": (0.0797664431, 0.0),
    "backbone.blocks.attn.qkv.kernel[0]": (0.0797664431, 1.0),
    "backbone.blocks.attn.qkv.kernel[12]": (0.2824295365, 1.0),
    "backbone.blocks.mlp.fc2.kernel[23]": (0.9, 1.0),
    "backbone.norm.scale": (1.0, 0.0), "backbone.norm.bias": (1.0, 0.0),
    "dino_head.mlp_0.kernel": (1.0, 1.0), "dino_head.mlp_2.bias": (1.0, 0.0),
    "ibot_head.mlp_1.kernel": (1.0, 1.0),
    "dino_head.last_layer.weight_v": (1.0, 1.0), "dino_head.last_layer.weight_g": (1.0, 1.0),
}


def _lookup(tree, key):
    name, _, layer = key.partition("[")
    leaf = tree
    for part in name.split("."):
        leaf = leaf[part]
    leaf = np.asarray(leaf)
    return leaf[int(layer[:-1])].item() if layer and leaf.ndim else leaf.item()


def test_multipliers_equal_spec_for_vit_large():
    params = _student_shapes(depth=24, registers=4)
    groups = optim.param_groups(params, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    for key, (lr_mult, wd_mult) in SPEC_11_4.items():
        assert float(_lookup(groups.lr_mult, key)) == pytest.approx(lr_mult, rel=1e-7), key
        assert _lookup(groups.wd_mult, key) == wd_mult, key
        assert _lookup(groups.is_last_layer, key) == ("last_layer" in key), key
    assert groups.lr_mult["backbone"]["blocks"]["attn"]["qkv"]["kernel"].shape == (24, 1, 1)


def test_multipliers_equal_the_reference_function_for_every_parameter():
    params = _student_shapes(depth=24)
    groups = optim.param_groups(params, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    for module, name, path, layer in _named_slices(params):
        depth = 24 if module == "backbone" else 0
        expected = param_groups_ref.get_vit_lr_decay_rate(
            name, 0.9, num_layers=depth, force_is_backbone=depth > 0)
        expected *= 0.2 if "patch_embed" in name else 1.0
        ours = np.asarray(_at(groups.lr_mult, path))
        assert (ours.item() if layer is None else ours[layer].item()) == np.float32(expected), name


def _config(epoch_length=1):
    return ml_collections.ConfigDict(dict(
        train=dict(batch_size=1024, epoch_length=epoch_length, freeze_backbone_steps=0),
        optim=dict(epochs=8, warmup_epochs=2, base_lr=0.05, min_lr=1e-3, weight_decay=0.5,
                   weight_decay_end=2.0, freeze_last_layer_epochs=1, layerwise_decay=0.8,
                   patch_embed_lr_mult=0.2, clip_grad=3.0, adamw_beta1=0.9, adamw_beta2=0.99,
                   scaling_rule="sqrt_wrt_1024"),
        teacher=dict(momentum_teacher=0.992, final_momentum_teacher=1.0,
                     warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2),
        # the DINOv3 sections at their defaults (DINOv2 schedules, constant loss weights)
        **{name: configs.default_config()[name].to_dict() for name in ("dino", "gram",
                                                                         "schedules")},
    ))


def _torch_student(params):
    """Sub-modules of nn.Parameters named like the reference; blocks is a ModuleList."""
    modules, slices = {}, []
    for module, name, path, layer in _named_slices(params):
        leaf = np.asarray(_at(params, path))
        value = torch.tensor(leaf if layer is None else leaf[layer], dtype=torch.float32)
        parent = modules.setdefault(module, torch.nn.Module())
        *parents, leaf_name = name.split(".")
        for part in parents:
            if part not in parent._modules:
                child = torch.nn.ModuleList() if part == "blocks" else torch.nn.Module()
                parent.add_module(part, child)
            parent = parent._modules[part]
        parameter = torch.nn.Parameter(value)
        parent.register_parameter(leaf_name, parameter)
        slices.append((module, parameter, path, layer))
    return modules, slices


def _reference_optimizer(modules, config):
    groups = []
    for module in modules.values():
        groups += param_groups_ref.fuse_params_groups(param_groups_ref.get_params_groups_with_decay(
            module, lr_decay_rate=config.optim.layerwise_decay,
            patch_embed_lr_mult=config.optim.patch_embed_lr_mult))
    betas = (config.optim.adamw_beta1, config.optim.adamw_beta2)
    return torch.optim.AdamW(groups, betas=betas)


def _reference_schedules(config):
    total, epoch = config.optim.epochs * config.train.epoch_length, config.train.epoch_length
    lr = utils.CosineScheduler(config.optim.base_lr, config.optim.min_lr, total,
                               config.optim.warmup_epochs * epoch)
    last_layer_lr = utils.CosineScheduler(config.optim.base_lr, config.optim.min_lr, total,
                                          config.optim.warmup_epochs * epoch)
    last_layer_lr.schedule[:config.optim.freeze_last_layer_epochs * epoch] = 0
    wd = utils.CosineScheduler(config.optim.weight_decay, config.optim.weight_decay_end, total)
    return lr, last_layer_lr, wd


def _random_like(params, scales):
    return {m: jax.tree.map(lambda x: np.float32(np.random.randn(*x.shape) * scales[m]), sub)
            for m, sub in params.items()}


# Each module's gradients are clipped in some steps and not in others, so per-module clipping
# (as opposed to one global norm, or none) changes Adam's moment ratios after step 0.
GRAD_SCALES = [{"backbone": 10.0, "dino_head": 0.01, "ibot_head": 1.0},
               {"backbone": 0.01, "dino_head": 10.0, "ibot_head": 0.01},
               {"backbone": 1.0, "dino_head": 0.1, "ibot_head": 10.0},
               {"backbone": 0.1, "dino_head": 10.0, "ibot_head": 0.1},
               {"backbone": 10.0, "dino_head": 0.1, "ibot_head": 1.0}]


def test_steps_equal_torch_adamw_with_reference_param_groups():
    config = _config()
    params = _random_like(_student_shapes(depth=3, dim=8), dict.fromkeys(GRAD_SCALES[0], 1.0))
    modules, slices = _torch_student(params)
    ref_opt = _reference_optimizer(modules, config)
    ref_lr, ref_last_layer_lr, ref_wd = _reference_schedules(config)

    tx = optim.make_optimizer(config, params, schedules.make_schedules(config))
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for step, scales in enumerate(GRAD_SCALES):
        grads = _random_like(params, scales)
        for group in ref_opt.param_groups:  # the reference's apply_optim_scheduler
            group["weight_decay"] = ref_wd[step] * group["wd_multiplier"]
            group["lr"] = ((ref_last_layer_lr[step] if group["is_last_layer"] else ref_lr[step])
                           * group["lr_multiplier"])
        for module, parameter, path, layer in slices:
            g = _at(grads, path)
            parameter.grad = torch.tensor(g if layer is None else g[layer])
        for module in modules.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), config.optim.clip_grad)
        ref_opt.step()

        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        logged = optim.logged_hyperparams(opt_state)
        assert int(opt_state.count) == step + 1
        np.testing.assert_allclose(
            [logged["lr"], logged["last_layer_lr"], logged["weight_decay"]],
            [ref_lr[step], ref_last_layer_lr[step], ref_wd[step]], rtol=1e-6)

    # fp32 on both sides; they differ in rounding and in torch's +1e-6 in the clip coefficient
    # (relative 1e-6 / norm on clipped gradients), far below 1e-5 on O(1) parameters.
    for module, parameter, path, layer in slices:
        ours = np.asarray(_at(params, path))
        np.testing.assert_allclose(ours if layer is None else ours[layer],
                                   parameter.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_last_layer_is_frozen_in_the_first_epoch():
    config = _config(epoch_length=2)
    params = _random_like(_student_shapes(depth=2), dict.fromkeys(GRAD_SCALES[0], 1.0))
    tx = optim.make_optimizer(config, params, schedules.make_schedules(config))
    opt_state = tx.init(params)
    grads = _random_like(params, GRAD_SCALES[0])
    for _ in range(3):  # steps 0, 1 frozen; step 2 moves; warmup step 0 has lr 0 everywhere
        updates, opt_state = tx.update(grads, opt_state, params)
        frozen = int(opt_state.count) <= 2
        last = np.asarray(updates["dino_head"]["last_layer"]["weight_v"])
        assert np.all(last == 0) == frozen
    assert np.any(np.asarray(updates["dino_head"]["mlp_0"]["kernel"]) != 0)


def test_clipping_is_per_module_like_torch():
    params = _student_shapes(depth=2)
    grads = _random_like(params, GRAD_SCALES[0])
    modules = tuple(grads)
    clip = optim.clip_by_global_norm_per_module(3.0, modules)
    clipped, _ = clip.update(grads, clip.init(params))
    for module in modules:
        tensors = [torch.nn.Parameter(torch.zeros(g.shape)) for g in jax.tree.leaves(grads[module])]
        for tensor, g in zip(tensors, jax.tree.leaves(grads[module])):
            tensor.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(tensors, 3.0)
        for ours, ref in zip(jax.tree.leaves(clipped[module]), tensors):
            np.testing.assert_allclose(ours, ref.grad.numpy(), rtol=1e-5, atol=1e-7)
    global_clip, _ = optax.clip_by_global_norm(3.0).update(grads, None)
    assert not np.allclose(global_clip["dino_head"]["mlp_0"]["kernel"],
                           clipped["dino_head"]["mlp_0"]["kernel"])


def test_bad_param_trees_are_rejected():
    params = _student_shapes(depth=2)
    with pytest.raises(ValueError, match="top-level"):
        optim.param_groups({"params": params}, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
