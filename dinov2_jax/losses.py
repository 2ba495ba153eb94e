"""DINOv2 and DINOv3 objectives as pure functions: teacher normalisation and the losses.

Teacher normalisation: softmax centering (`softmax_center` + `update_center`, the center is
carried in the train state) or Sinkhorn-Knopp (`sinkhorn_knopp`). Losses: `dino_loss` (cls
tokens, multi-crop pairing), `ibot_loss` (masked patch tokens of a static-size buffer) and
`koleo_loss`; DINOv3's Gram anchoring (`gram_loss`, `resize_patch_tokens`), DINO loss over
crop pairs (`dino_pairs_loss`) and distributed KoLeo (`koleo_loss_distributed`). All math runs
in float32 whatever the input dtype. Functions that need sums over the whole data-parallel
batch take `axis_name` and are meant for `jax.shard_map`.
"""
import jax
import jax.numpy as jnp

from dinov2_jax.models import heads, pos_embed

STUDENT_TEMP = 0.1
CENTER_MOMENTUM = 0.9


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _safe_div(x, d):
    return x / jnp.where(d == 0, 1.0, d)


def _cross_entropy(teacher_probs, student_logits, student_temp):
    """Per-row sum_k t_k log_softmax(s / temp)_k (positive log-likelihood)."""
    log_p = jax.nn.log_softmax(_f32(student_logits) / student_temp, axis=-1)
    return jnp.sum(_f32(teacher_probs) * log_p, axis=-1)


def softmax_center(teacher_logits, center, teacher_temp):
    """softmax((t - center) / teacher_temp) over the last axis; center (K,) broadcasts."""
    return jax.nn.softmax((_f32(teacher_logits) - _f32(center)) / teacher_temp, axis=-1)


def update_center(center, teacher_logits, momentum=CENTER_MOMENTUM, *, valid=None,
                  axis_name=None):
    """EMA of the teacher logits: center * m + batch_center * (1 - m); returns (K,).

    teacher_logits (..., R, K): leading axes index groups, R rows per group. batch_center is the
    mean over each group's valid rows, then the unweighted mean over groups (and over `axis_name`
    devices, each holding the same number of groups). For the DINO center pass the cls logits
    (2B, K): one group, the plain row mean. For the iBOT center pass the masked-patch buffer as
    (G, U, K) with valid = masks_weight > 0: the reference's per-rank mean over masked patches,
    averaged over ranks. Groups without valid rows are left out of the average; if no group has
    any, the center is returned unchanged.

    Use: probs = softmax_center(t, center, temp); next_center = update_center(center, t). The
    next step uses next_center, which is the reference's one-step lag.
    """
    t = _f32(teacher_logits)
    if valid is None:
        valid = jnp.ones(t.shape[:-1], bool)
    valid = jnp.asarray(valid, bool)[..., None]
    rows = jnp.sum(_f32(valid), axis=-2)
    group_sums = jnp.sum(jnp.where(valid, t, 0.0), axis=-2)
    group_means = _safe_div(group_sums, rows).reshape(-1, t.shape[-1])
    has_rows = (rows > 0).reshape(-1, 1)
    total = jnp.sum(group_means * has_rows, axis=0)
    n_groups = jnp.sum(has_rows)
    if axis_name is not None:
        total, n_groups = jax.lax.psum((total, n_groups), axis_name)
    center = _f32(center)
    new_center = center * momentum + _safe_div(total, n_groups) * (1 - momentum)
    return jnp.where(n_groups > 0, new_center, center)


def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3, valid=None, axis_name=None):
    """Sinkhorn-Knopp teacher probabilities (..., K) from logits (..., K)
    (`dinov2/loss/dino_clstoken_loss.py`).

    Every axis but the last holds samples. `valid` (...) marks real rows; others (padding of the
    static iBOT buffer) take no part in any sum and get probability 0. With `axis_name` the total,
    the per-prototype sums and the sample count are psum'ed over that axis (use under
    jax.shard_map with the samples sharded). The exponent is shifted by the global max logit, a
    constant that cancels in the first normalisation, so the result equals the reference's.
    """
    t = _f32(teacher_logits) / teacher_temp
    if valid is None:
        valid = jnp.ones(t.shape[:-1], bool)
    valid = jnp.asarray(valid, bool)[..., None]
    sample_axes = tuple(range(t.ndim - 1))
    reduce = (lambda x: x) if axis_name is None else (lambda x: jax.lax.psum(x, axis_name))

    t_max = jnp.max(jnp.where(valid, t, -jnp.inf))
    if axis_name is not None:
        t_max = jax.lax.pmax(t_max, axis_name)
    t_max = jnp.where(jnp.isfinite(t_max), t_max, 0.0)
    q = jnp.where(valid, jnp.exp(t - t_max), 0.0)
    n_samples = reduce(jnp.sum(_f32(valid)))
    n_prototypes = t.shape[-1]

    q = _safe_div(q, reduce(jnp.sum(q)))
    for _ in range(n_iterations):
        q = _safe_div(q, reduce(jnp.sum(q, axis=sample_axes, keepdims=True)))
        q = q / n_prototypes
        q = _safe_div(q, jnp.sum(q, axis=-1, keepdims=True))
        q = _safe_div(q, n_samples)
    return q * n_samples


def _mean_cross_entropy(student_logits, teacher_probs, student_temp):
    return -jnp.mean(_cross_entropy(teacher_probs, student_logits, student_temp))


def dino_loss(student_global_logits, student_local_logits, teacher_probs,
              student_temp=STUDENT_TEMP):
    """DINO cls-token loss (`dinov2/loss/dino_clstoken_loss.py`): (local_loss, global_loss)
    as the reference logs them.

    student_global_logits (2, B, K): crop-major, [c] = global crop c of every image.
    student_local_logits (n_local, B, K): [i] = local crop i of every image (n_local may be 0).
    teacher_probs (2, B, K): teacher probabilities of global crops 0 and 1, in that order. The
      cross-view swap happens here: student global crop c is scored against teacher crop 1 - c.
    Every term is a cross-entropy averaged over the B images. With n_terms = 2 + max(2 n_local, 1)
    (3 when n_local = 0, the reference's quirk): local_loss = (sum over the 2 n_local
    local x global pairs) / n_terms (0 when n_local = 0), global_loss = (CE(s0, t1) + CE(s1, t0))
    / n_terms. The optimised DINO loss is local_loss + global_loss.
    """
    n_local = student_local_logits.shape[0]
    n_terms = 2 + max(2 * n_local, 1)
    teacher_swapped = teacher_probs[::-1]
    global_terms = jax.vmap(_mean_cross_entropy, (0, 0, None))(
        student_global_logits, teacher_swapped, student_temp)
    local_terms = jax.vmap(jax.vmap(_mean_cross_entropy, (None, 0, None)), (0, None, None))(
        student_local_logits, teacher_probs, student_temp)
    return jnp.sum(local_terms) / n_terms, jnp.sum(global_terms) / n_terms


def ibot_loss(student_patch_logits, teacher_patch_probs, masks_weight, n_crops,
              student_temp=STUDENT_TEMP):
    """iBOT masked-patch loss (`dinov2/loss/ibot_patch_loss.py`):
    -sum_j w_j sum_k t_jk log_softmax(s_j/temp)_k / n_crops.

    student_patch_logits, teacher_patch_probs (..., K) and masks_weight (...) hold the rows of the
    static masked-patch buffer (any leading layout, e.g. (G, U)); w_j = 1/m_i of the crop a masked
    patch belongs to, 0 on padding rows, which contribute nothing. n_crops is the number of
    global-crop images the buffer covers, masked or not (2B).
    """
    w = _f32(masks_weight)
    ce = _cross_entropy(teacher_patch_probs, student_patch_logits, student_temp)
    return -jnp.sum(jnp.where(w > 0, w * ce, 0.0)) / n_crops


def koleo_loss(x, eps=1e-8):
    """KoLeo regulariser (`dinov2/loss/koleo_loss.py`) over the n rows of x (..., n, D);
    returns shape (...).

    Rows are L2-normalised (norm clamped at eps), each row's nearest neighbour is the other row
    of largest inner product, d_i = ||x_i - x_nn(i) + eps|| (eps on the difference vector, as
    torch's PairwiseDistance) and the loss is -mean_i log(d_i + eps). Duplicate rows stay finite.
    """
    x = _f32(x)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    n = x.shape[-2]
    dots = jnp.einsum("...id,...jd->...ij", x, x)
    dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)
    nearest = jnp.argmax(dots, axis=-1)
    neighbours = jnp.take_along_axis(x, nearest[..., None], axis=-2)
    distances = jnp.linalg.norm(x - neighbours + eps, axis=-1)
    return -jnp.mean(jnp.log(distances + eps), axis=-1)


# --------------------------------------------------------------------------------------------
# DINOv3 objectives (`dinov3/loss/*.py`, `dinov3/train/ssl_meta_arch.py`).


def dino_pairs_loss(student_logits, teacher_probs, ignore_diagonal=False,
                    student_temp=STUDENT_TEMP):
    """DINOv3's `DINOLoss.forward`: the mean cross-entropy over every (student, teacher) crop pair.

    student_logits (S, B, K), teacher_probs (T, B, K), crop-major. Every image's S x T pairs
    are scored, each a cross-entropy of softmax(s / temp) against t; the result is their mean
    over pairs and images. `ignore_diagonal` leaves out the same-view pairs s == t (the DINO
    global loss, `dino.global_ignore_diagonal`), dividing by B * (S * T - min(S, T)).
    """
    n_student, batch = student_logits.shape[:2]
    n_teacher = teacher_probs.shape[0]
    log_p = jax.nn.log_softmax(_f32(student_logits) / student_temp, axis=-1)
    pair_sums = -jnp.einsum("sbk,tbk->st", log_p, _f32(teacher_probs),
                            precision=jax.lax.Precision.HIGHEST)
    n_pairs = n_student * n_teacher
    if ignore_diagonal:
        pair_sums = jnp.where(jnp.eye(n_student, n_teacher, dtype=bool), 0.0, pair_sums)
        n_pairs -= min(n_student, n_teacher)
    return jnp.sum(pair_sums) / (batch * n_pairs)


def dino_loss_scales(n_global, n_local, ignore_diagonal=True):
    """(global_scale, local_scale): DINOv3's split of the DINO weight by crop-pair counts.

    Global terms n_global * (n_global - 1) (same-view pairs ignored) or n_global ** 2, local
    terms n_global * n_local; each scale is its share of all terms (`compute_losses`).
    """
    global_terms = n_global * (n_global - 1) if ignore_diagonal else n_global ** 2
    local_terms = n_global * n_local
    total = global_terms + local_terms
    return global_terms / total, local_terms / total


def gram_loss(student_patches, teacher_patches, *, img_level=True, groups=1, normalize=True,
              remove_neg=False, remove_only_teacher_neg=False):
    """DINOv3's Gram anchoring loss (`dinov3/loss/gram_loss.py`), in float32.

    student_patches, teacher_patches (B, P, D): final normed patch tokens of the student's global
    crops and of the Gram teacher (same grid). With `normalize` every patch vector is
    L2-normalised. `img_level` builds one P x P similarity (Gram) matrix per image; otherwise the
    B images are split into `groups` consecutive groups (the reference: one per device, its local
    batch) and each group's B/groups*P patches make one matrix. The loss is the mean squared
    difference of student and teacher matrices over all entries (torch's MSELoss).
    `remove_neg` clamps negative similarities of both to 0; `remove_only_teacher_neg` clamps the
    teacher's only: the reference also zeroes student entries where the teacher's is negative,
    but tests that after clamping the teacher, so no student entry changes.
    """
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("gram_loss: set at most one of remove_neg and remove_only_teacher_neg")
    student, teacher = _f32(student_patches), _f32(teacher_patches)
    if student.shape != teacher.shape or student.ndim != 3:
        raise ValueError(f"gram_loss: student {student.shape} and teacher {teacher.shape} patches "
                         "must both be (B, P, D)")
    if normalize:
        student, teacher = heads.l2_normalize(student), heads.l2_normalize(teacher)
    if not img_level:
        batch, patches, dim = student.shape
        if batch % groups:
            raise ValueError(f"gram_loss: {batch} images do not split into {groups} groups")
        student = student.reshape(groups, batch // groups * patches, dim)
        teacher = teacher.reshape(groups, batch // groups * patches, dim)
    gram = lambda x: jnp.einsum("gpd,gqd->gpq", x, x, precision=jax.lax.Precision.HIGHEST)
    student_sim, teacher_sim = gram(student), gram(teacher)
    if remove_neg or remove_only_teacher_neg:
        teacher_sim = jnp.maximum(teacher_sim, 0.0)
    if remove_neg:
        student_sim = jnp.maximum(student_sim, 0.0)
    return jnp.mean(jnp.square(student_sim - teacher_sim))


def resize_patch_tokens(patches, grid, out_grid, *, antialias=False):
    """The Gram teacher's patch tokens (B, h*w, D) on a (h, w) grid -> (B, H*W, D) on out_grid.

    The reference (`get_gram_teacher_output` of `dinov3/train/ssl_meta_arch.py`) resizes the
    teacher's patch map of its larger crops to the student's grid with torch's bicubic
    interpolate, align_corners=False and, by default (`gram.global_teacher_resize_antialias`),
    no antialias; `jax.image.resize` would antialias and use other cubic weights.
    """
    batch, tokens, dim = patches.shape
    if tokens != grid[0] * grid[1]:
        raise ValueError(f"resize_patch_tokens: {tokens} tokens are not a {grid[0]}x{grid[1]} grid")
    x = patches.reshape(batch, grid[0], grid[1], dim)
    x = pos_embed.resize_grid(x, out_grid[0], out_grid[1], antialias=antialias)
    return x.reshape(batch, out_grid[0] * out_grid[1], dim)


def koleo_loss_distributed(x, *, axis_name=None, group_size=None, topk=1, eps=1e-8):
    """DINOv3's `KoLeoLossDistributed`: KoLeo with nearest neighbours among a group of devices.

    Call under `jax.shard_map` with x (local_B, D) this device's rows and `axis_name` the batch
    axis: the rows of all devices are gathered (in device order) and cut into consecutive groups
    of `group_size` rows (default: the whole global batch), each a multiple of local_B; a row's
    `topk` neighbours are the other rows of its group of largest inner product (rows
    L2-normalised, norm clamped at eps), d = ||x - x_nn + eps|| and the loss is
    -mean log(d + eps) over the local rows and their k neighbours. The result is that mean
    averaged over devices (the gradient the reference's data-parallel all-reduce sees). With
    `axis_name=None`, x is the whole batch on one device.
    """
    x = heads.l2_normalize(_f32(x), eps)
    local_batch = x.shape[0]
    if axis_name is None:
        all_x, rank, world = x, 0, 1
    else:
        all_x = jax.lax.all_gather(x, axis_name, tiled=True)
        rank, world = jax.lax.axis_index(axis_name), jax.lax.axis_size(axis_name)
    global_batch = all_x.shape[0]
    group_size = global_batch if group_size is None else group_size
    if group_size % local_batch or global_batch % group_size:
        raise ValueError(f"koleo group size {group_size} must be a multiple of the local batch "
                         f"{local_batch} and divide the global batch {global_batch}")
    ranks_per_group = world // (global_batch // group_size)
    group_rows = jax.lax.dynamic_slice_in_dim(all_x, (rank // ranks_per_group) * group_size,
                                              group_size)
    dots = jax.lax.stop_gradient(x @ group_rows.T)
    own_columns = (rank % ranks_per_group) * local_batch + jnp.arange(local_batch)
    dots = jnp.where(jnp.arange(group_size)[None] == own_columns[:, None], -1.0, dots)
    _, nearest = jax.lax.top_k(dots, topk)
    distances = jnp.linalg.norm(x[:, None] - group_rows[nearest] + eps, axis=-1)
    loss = -jnp.mean(jnp.log(distances + eps))
    return loss if axis_name is None else jax.lax.pmean(loss, axis_name)
