"""The DINOv2 train step: teacher forward, student forward, losses, update, EMA. One jit.

Batch layout (see `dinov2_jax.data`): global crops (2, B, H, W, 3) crop-major, local crops
(n_local, B, h, w, 3), masks (2, B, N), and the static masked-patch buffer `mask_indices` /
`masks_weight` (G, U): per mask group g of B/G consecutive images (the reference's per-GPU
batch), flat indices into that group's (2, B/G, N) patch grid. Groups stand for the
reference's ranks wherever it reduces per rank: the iBOT center and KoLeo. With DINOv3's Gram
anchoring the batch may also hold "gram_teacher_crops" (2, B, H', W', 3), the global crops'
boxes at the Gram teacher's size.

DINOv3 options (`dinov3/train/ssl_meta_arch.py`, `dinov3/train/train.py`), all off by default:
`dino.loss_form="dinov3"` (pair-mean DINO terms split by pair counts, same-view pairs left out),
the local-crop DINO weight schedule, distributed KoLeo over groups of devices (under
`jax.shard_map` on the run's mesh), and the Gram loss against a third backbone that the step
itself copies from the EMA teacher (at `gram.it_load_ema_teacher`, then every
`gram.update_frequency` steps up to `gram.max_updates` times) with `lax.cond` on the step, so
the state's shapes never change and a resumed run is exact.
"""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from dinov2_jax import losses, parallel
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
    return (jax.lax.stop_gradient((cls_probs, patch_probs)), jax.lax.stop_gradient(centers),
            jax.lax.stop_gradient(patches))


def gram_updates_before(step, gram):
    """How many Gram teacher refreshes happened before the update after step `step` - 1, i.e.
    after steps k - 1 with k in [max(it_first_update, 1), step) and k % update_frequency == 0
    (the reference's loop, `dinov3/train/train.py`, counts them as it goes)."""
    first = max(gram.it_first_update, 1)
    freq = gram.update_frequency
    return jnp.maximum((step - 1) // freq - (first - 1) // freq, 0)


def gram_refresh_due(step, gram):
    """After step `step` - 1 (its EMA update done): is the Gram teacher refreshed now?"""
    due = (step >= gram.it_first_update) & (step % gram.update_frequency == 0)
    if gram.max_updates >= 0:
        due &= gram_updates_before(step, gram) < gram.max_updates
    return due


def gram_active(step, config):
    """Whether the Gram teacher exists at `step`: from a checkpoint or the EMA teacher always,
    else from step gram.it_load_ema_teacher on (the reference stops with an error if its loss
    is asked for earlier; here the term is off and the teacher forward skipped until then)."""
    gram = config.gram
    if gram.ema_teacher or gram.ckpt:
        return jnp.asarray(True)
    return step >= gram.it_load_ema_teacher


def _gram_targets(networks, config, gram_teacher, batch, ema_patches, active):
    """The Gram teacher's final normed patch tokens (2 * B, N, D) on the student's grid,
    crop-major; zeros while it is not active (its forward is then skipped)."""
    if config.gram.ema_teacher:
        return ema_patches.reshape(-1, *ema_patches.shape[2:])
    crops = batch.get("gram_teacher_crops", batch["global_crops"])
    patch = networks.backbone.patch_size
    grid = (crops.shape[2] // patch, crops.shape[3] // patch)
    out_grid = (batch["global_crops"].shape[2] // patch, batch["global_crops"].shape[3] // patch)
    n_crops, batch_size = crops.shape[:2]
    shape = (n_crops * batch_size, out_grid[0] * out_grid[1], networks.backbone.embed_dim)

    def forward():
        out = networks.backbone.apply({"params": gram_teacher}, _flatten_crops(crops))
        patches = out["x_norm_patchtokens"]
        if grid != out_grid:
            patches = losses.resize_patch_tokens(
                patches, grid, out_grid, antialias=config.gram.global_teacher_resize_antialias)
        patches = _unflatten_crops(patches, n_crops)
        return patches.reshape(shape).astype(jnp.float32)

    return jax.lax.stop_gradient(
        jax.lax.cond(active, forward, lambda: jnp.zeros(shape, jnp.float32)))


def _gram_loss(config, patches, teacher_patches, groups):
    """DINOv3's Gram loss of the student's global-crop patch tokens (2, B, N, D) against the
    Gram teacher's (2 * B, N, D). Without img_level one matrix per mask group (the reference's
    per-GPU batch: both crops of its images); the order of rows inside a matrix is free."""
    gram = config.gram
    crops, batch_size = patches.shape[:2]
    student = patches.reshape(crops * batch_size, *patches.shape[2:])
    if not gram.img_level:  # crop-major rows -> group-major (group, crop, image) rows
        regroup = lambda x: x.reshape(crops, groups, batch_size // groups, *x.shape[1:]).swapaxes(
            0, 1).reshape(crops * batch_size, *x.shape[1:])
        student, teacher_patches = regroup(student), regroup(teacher_patches)
    return losses.gram_loss(student, teacher_patches, img_level=gram.img_level,
                            groups=groups, normalize=gram.normalized, remove_neg=gram.remove_neg,
                            remove_only_teacher_neg=gram.remove_only_teacher_neg)


def _koleo(config, global_cls, groups, mesh):
    """KoLeo on the student's pre-head global cls tokens (crops, B, D), summed over crops.

    DINOv2: per mask group (the reference's rank), averaged over groups. DINOv3's distributed
    KoLeo (`dino.koleo_loss_distributed`): nearest neighbours among groups of
    `koleo_distributed_loss_group_size` consecutive images, gathered across devices under
    `shard_map` (`losses.koleo_loss_distributed`); without a mesh the same groups on one device.
    """
    crops, batch_size = global_cls.shape[:2]
    dino = config.dino
    if not dino.koleo_loss_distributed:
        return jnp.sum(jnp.mean(losses.koleo_loss(
            global_cls.reshape(crops, groups, batch_size // groups, -1)), axis=1))
    group_size = dino.koleo_distributed_loss_group_size or batch_size
    if mesh is None:
        per_group = jax.vmap(lambda rows: losses.koleo_loss_distributed(
            rows, topk=dino.koleo_topk))
        return sum(jnp.mean(per_group(x.reshape(-1, group_size, x.shape[-1])))
                   for x in global_cls)

    def local(cls):  # (crops, local_B, D) on each device
        return sum(losses.koleo_loss_distributed(
            x, axis_name=parallel.BATCH_AXES, group_size=group_size, topk=dino.koleo_topk)
            for x in cls)

    return jax.shard_map(local, mesh=mesh, in_specs=P(None, parallel.BATCH_AXES),
                         out_specs=P())(global_cls)


def _student_loss(networks, config, student, batch, targets, rng, weights, mesh):
    """The optimised loss and the reference's logged loss values.

    `weights`: the step's DINOv3 loss weights {"dino_local", "gram"} and, with the Gram loss,
    "gram_patches" (the Gram teacher's patch tokens) and "gram_active".
    """
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

    groups = batch["mask_indices"].shape[0]
    if config.dino.loss_form == "dinov3":  # compute_losses of dinov3/train/ssl_meta_arch.py
        ignore = config.dino.global_ignore_diagonal
        global_scale, local_scale = losses.dino_loss_scales(crops, n_local, ignore)
        dino_local = losses.dino_pairs_loss(local_logits, cls_probs)
        dino_global = losses.dino_pairs_loss(global_logits, cls_probs, ignore_diagonal=ignore)
        dino = local_scale * weights["dino_local"] * dino_local + global_scale * dino_global
    else:
        dino_local, dino_global = losses.dino_loss(global_logits, local_logits, cls_probs)
        dino = dino_local + dino_global
        if tuple(config.dino.local_loss_weight_schedule):
            dino = weights["dino_local"] * dino_local + dino_global
    koleo = _koleo(config, global_cls, groups, mesh)
    ibot = losses.ibot_loss(patch_logits, patch_probs, batch["masks_weight"], crops * batch_size)
    loss = (config.dino.loss_weight * dino
            + config.dino.koleo_loss_weight * koleo + config.ibot.loss_weight * ibot)
    logged = {"dino_local_crops_loss": dino_local, "dino_global_crops_loss": dino_global,
              "koleo_loss": config.dino.koleo_loss_weight * koleo / 2, "ibot_loss": ibot / 2}
    logged["total_loss"] = sum(logged.values())
    if config.gram.use_loss:
        gram = _gram_loss(config, patches, weights["gram_patches"], groups)
        gram = jnp.where(weights["gram_active"], gram, 0.0)
        loss = loss + weights["gram"] * gram
        logged["gram_loss"] = gram
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


def make_train_step(networks, config, optimizer, schedules, mesh=None):
    """train_step(state, batch) -> (state, metrics), pure; wrap it in jax.jit.

    `mesh`: the run's mesh, for DINOv3's distributed KoLeo (shard_map over the batch axes).
    """
    base_rng = jax.random.PRNGKey(config.train.seed)
    has_gram_teacher = state_lib.has_gram_teacher(config)

    def train_step(state, batch):
        step = state["step"]
        teacher_temp = schedules.teacher_temp(step)
        momentum = schedules.momentum(step)
        targets, centers, ema_patches = _teacher_targets(
            networks, config, state["teacher"], state["centers"], batch, teacher_temp)
        weights = {"dino_local": schedules.dino_local_weight(step)}
        extra_state, extra_metrics = {}, {}
        if config.gram.use_loss:
            gram_teacher = state.get("gram_teacher")
            if has_gram_teacher and not config.gram.ckpt:  # the EMA teacher before this step
                gram_teacher = jax.lax.cond(step == config.gram.it_load_ema_teacher,
                                            lambda: state["teacher"]["backbone"],
                                            lambda: gram_teacher)
            active = gram_active(step, config)
            weights.update(gram=schedules.gram_weight(step), gram_active=active,
                           gram_patches=_gram_targets(networks, config, gram_teacher, batch,
                                                      ema_patches, active))
            extra_metrics["gram_loss_weight"] = jnp.where(active, weights["gram"], 0.0)
        if tuple(config.dino.local_loss_weight_schedule):
            extra_metrics["dino_local_loss_weight"] = weights["dino_local"]
        rng = jax.random.fold_in(base_rng, step)
        grad_fn = jax.value_and_grad(
            lambda params: _student_loss(networks, config, params, batch, targets, rng, weights,
                                         mesh),
            has_aux=True)
        (loss, logged), grads = grad_fn(state["student"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["student"])
        student = optax.apply_updates(state["student"], updates)
        teacher = state_lib.ema_update(state["teacher"], student, momentum)
        if config.train.freeze_backbone_steps:
            teacher = state_lib.hold_backbone(teacher, state["teacher"],
                                              step < config.train.freeze_backbone_steps)
        if has_gram_teacher:  # with rep_update, refreshed from the updated EMA teacher
            extra_state["gram_teacher"] = gram_teacher if not config.gram.rep_update else (
                jax.lax.cond(gram_refresh_due(step + 1, config.gram),
                             lambda: teacher["backbone"], lambda: gram_teacher))
        metrics = {**logged, "loss": loss, "teacher_temp": teacher_temp, "momentum": momentum,
                   **teacher_statistics(targets, batch["masks_weight"]),
                   **{f"grad_norm/{name}": optax.global_norm(g) for name, g in grads.items()},
                   **{name: value for name, value in opt_state.hyperparams.items()},
                   **extra_metrics}
        new_state = {"step": step + 1, "student": student, "teacher": teacher,
                     "opt_state": opt_state, "centers": centers, **extra_state}
        return new_state, metrics

    return train_step
