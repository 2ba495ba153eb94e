"""The DINOv2 train step: teacher forward, student forward, losses, update, EMA. One jit.

Batch layout (see `dinov2_jax.data`): global crops (2, B, H, W, 3) crop-major, local crops
(n_local, B, h, w, 3), masks (2, B, N), and the static masked-patch buffer `mask_indices` /
`masks_weight` (G, U): per mask group g of B/G consecutive images (the reference's per-GPU
batch), flat indices into that group's (2, B/G, N) patch grid. Groups stand for the
reference's ranks wherever it reduces per rank: the iBOT center and KoLeo.
"""
import jax
import jax.numpy as jnp
import optax

from dinov2_jax import losses
from dinov2_jax.train import state as state_lib


def _flatten_crops(x):
    """(crops, B, ...) -> (B * crops, ...), image-major.

    Image-major keeps each device's images on that device when B is sharded; a crop-major
    reshape would gather the whole batch everywhere. The backbone is per image, so the order
    of rows changes nothing but which rows a drop-path draw keeps.
    """
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _unflatten_crops(x, crops):
    """(B * crops, ...) -> (crops, B, ...), the inverse of _flatten_crops."""
    return x.reshape(-1, crops, *x.shape[1:]).swapaxes(0, 1)


def gather_masked_patches(patch_tokens, mask_indices):
    """(2, B, N, D) patch tokens -> (G, U, D) rows of the static masked-patch buffer."""
    crops, batch, patches, dim = patch_tokens.shape
    groups = mask_indices.shape[0]
    grouped = patch_tokens.reshape(crops, groups, batch // groups, patches, dim)
    grouped = grouped.transpose(1, 0, 2, 3, 4).reshape(groups, -1, dim)
    return jnp.take_along_axis(grouped, mask_indices[..., None], axis=1)


def _teacher_targets(networks, config, teacher, centers, batch, teacher_temp):
    """Teacher probabilities for cls (2, B, K) and masked patches (G, U, K); new centers."""
    global_crops = batch["global_crops"]
    out = networks.backbone.apply({"params": teacher["backbone"]}, _flatten_crops(global_crops))
    crops = global_crops.shape[0]
    cls = _unflatten_crops(out["x_norm_clstoken"], crops)
    patches = _unflatten_crops(out["x_norm_patchtokens"], crops)
    cls_logits = networks.dino_head.apply({"params": teacher["dino_head"]}, cls)
    patch_head_params = teacher["ibot_head"] if networks.ibot_head else teacher["dino_head"]
    patch_logits = networks.patch_head().apply(
        {"params": patch_head_params}, gather_masked_patches(patches, batch["mask_indices"]))
    valid = batch["masks_weight"] > 0
    if config.train.centering == "centering":
        cls_probs = losses.softmax_center(cls_logits, centers["dino"], teacher_temp)
        patch_probs = losses.softmax_center(patch_logits, centers["ibot"], teacher_temp)
        centers = {"dino": losses.update_center(centers["dino"], cls_logits.reshape(-1, cls_logits.shape[-1])),
                   "ibot": losses.update_center(centers["ibot"], patch_logits, valid=valid)}
    elif config.train.centering == "sinkhorn_knopp":
        cls_probs = losses.sinkhorn_knopp(cls_logits, teacher_temp)
        patch_probs = losses.sinkhorn_knopp(patch_logits, teacher_temp, valid=valid)
    else:  # "none": the sharpened softmax alone, the ablation that collapses to one prototype
        cls_probs = jax.nn.softmax(cls_logits.astype(jnp.float32) / teacher_temp, axis=-1)
        patch_probs = jax.nn.softmax(patch_logits.astype(jnp.float32) / teacher_temp, axis=-1)
    return jax.lax.stop_gradient((cls_probs, patch_probs)), jax.lax.stop_gradient(centers)


def _student_loss(networks, config, student, batch, targets, rng):
    """The optimised loss and the reference's logged loss values."""
    cls_probs, patch_probs = targets
    global_crops, local_crops = batch["global_crops"], batch["local_crops"]
    crops, batch_size = global_crops.shape[:2]
    n_local = local_crops.shape[0]
    global_out, local_out = networks.backbone.apply(
        {"params": student["backbone"]},
        [_flatten_crops(global_crops), _flatten_crops(local_crops)],
        [None if batch["masks"] is None else _flatten_crops(batch["masks"]), None], train=True,
        rngs={"dropout": rng})
    global_cls = _unflatten_crops(global_out["x_norm_clstoken"], crops)
    local_cls = _unflatten_crops(local_out["x_norm_clstoken"], n_local)
    patches = _unflatten_crops(global_out["x_norm_patchtokens"], crops)
    dino_head = {"params": student["dino_head"]}
    global_logits = networks.dino_head.apply(dino_head, global_cls)
    local_logits = networks.dino_head.apply(dino_head, local_cls)
    patch_head = {"params": student["ibot_head"] if networks.ibot_head else student["dino_head"]}
    patch_logits = networks.patch_head().apply(
        patch_head, gather_masked_patches(patches, batch["mask_indices"]))

    dino_local, dino_global = losses.dino_loss(global_logits, local_logits, cls_probs)
    groups = batch["mask_indices"].shape[0]
    koleo = jnp.sum(jnp.mean(losses.koleo_loss(
        global_cls.reshape(crops, groups, batch_size // groups, -1)), axis=1))
    ibot = losses.ibot_loss(patch_logits, patch_probs, batch["masks_weight"], crops * batch_size)
    loss = (config.dino.loss_weight * (dino_local + dino_global)
            + config.dino.koleo_loss_weight * koleo + config.ibot.loss_weight * ibot)
    logged = {"dino_local_crops_loss": dino_local, "dino_global_crops_loss": dino_global,
              "koleo_loss": config.dino.koleo_loss_weight * koleo / 2, "ibot_loss": ibot / 2}
    logged["total_loss"] = sum(logged.values())
    return loss, logged


def _entropy(probs):
    return -jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


def _row_entropies(probs, weights):
    """Collapse statistics of teacher targets (rows, K) with row weights, as fractions of
    log K: the mean per-row entropy (near 1: uniform targets) and the entropy of the mean
    distribution (near 0: every row on one prototype)."""
    weights = weights / jnp.maximum(jnp.sum(weights), 1e-12)
    log_k = jnp.log(probs.shape[-1])
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    mean = jnp.sum(probs * weights[:, None], axis=0)
    return (jnp.sum(entropy * weights) / log_k,
            -jnp.sum(mean * jnp.log(jnp.maximum(mean, 1e-30))) / log_k)


def teacher_statistics(targets, masks_weight):
    """The teacher targets' collapse statistics (`_row_entropies`) per head, and the DINO
    targets' mean entropy in nats."""
    cls_probs, patch_probs = targets
    cls_rows = cls_probs.reshape(-1, cls_probs.shape[-1])
    dino = _row_entropies(cls_rows, jnp.ones(cls_rows.shape[:1], jnp.float32))
    ibot = _row_entropies(patch_probs.reshape(-1, patch_probs.shape[-1]),
                          (masks_weight > 0).reshape(-1).astype(jnp.float32))
    return {"teacher_entropy": _entropy(cls_probs),
            "dino/entropy": dino[0], "dino/batch_entropy": dino[1],
            "ibot/entropy": ibot[0], "ibot/batch_entropy": ibot[1]}


def make_train_step(networks, config, optimizer, schedules):
    """train_step(state, batch) -> (state, metrics), pure; wrap it in jax.jit."""
    base_rng = jax.random.PRNGKey(config.train.seed)

    def train_step(state, batch):
        step = state["step"]
        teacher_temp = schedules.teacher_temp(step)
        momentum = schedules.momentum(step)
        targets, centers = _teacher_targets(networks, config, state["teacher"], state["centers"],
                                            batch, teacher_temp)
        rng = jax.random.fold_in(base_rng, step)
        grad_fn = jax.value_and_grad(
            lambda params: _student_loss(networks, config, params, batch, targets, rng),
            has_aux=True)
        (loss, logged), grads = grad_fn(state["student"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["student"])
        student = optax.apply_updates(state["student"], updates)
        teacher = state_lib.ema_update(state["teacher"], student, momentum)
        if config.train.freeze_backbone_steps:
            teacher = state_lib.hold_backbone(teacher, state["teacher"],
                                              step < config.train.freeze_backbone_steps)
        metrics = {**logged, "loss": loss, "teacher_temp": teacher_temp, "momentum": momentum,
                   **teacher_statistics(targets, batch["masks_weight"]),
                   **{f"grad_norm/{name}": optax.global_norm(g) for name, g in grads.items()},
                   **{name: value for name, value in opt_state.hyperparams.items()}}
        new_state = {"step": step + 1, "student": student, "teacher": teacher,
                     "opt_state": opt_state, "centers": centers}
        return new_state, metrics

    return train_step
