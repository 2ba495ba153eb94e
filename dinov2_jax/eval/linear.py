"""Linear probe on frozen features: the reference's grid of heads (`dinov2/eval/linear.py`).

Inputs per image (from `extract`, features "blocks_cls" and "patch_mean"): the cls tokens of
the last n blocks through the final norm, concatenated, plus (avgpool) the mean of the last
block's patch tokens; n in {1, 4} x avgpool in {False, True} x 13 base learning rates = 52
linear heads, trained jointly on the sum of their cross-entropies. Heads start at weight
N(0, 0.01^2), bias 0. SGD, momentum 0.9, no weight decay; head lr = base_lr * batch / 256,
cosine-annealed to 0 over epochs * epoch_length iterations (stepped every iteration). The
best head is the one with the best top-1 on val; the reference's defaults are 10 epochs of
1250 iterations at batch 128.

One difference from the reference, by design: the features are extracted once with the eval
transform (resize, center crop) and cached, where the reference re-augments train images
(RandomResizedCrop + flip) through the frozen backbone at every iteration. Training the 52
heads is then seconds, and the backbone runs once per image.

  python -m dinov2_jax.eval.linear --weights W [--arch A] --train SRC --val SRC [--output F]

Trained with optax; the protocol is in docs/reference.md, Evaluation.
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from absl import flags

from dinov2_jax import cli
from dinov2_jax.eval import cli_flags, extract

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
N_LAST_BLOCKS = (1, 4)
AVGPOOL = (False, True)
EPOCHS = 10
EPOCH_LENGTH = 1250
BATCH_SIZE = 128
FEATURES = ("blocks_cls", "patch_mean")


def group_name(n_last_blocks, avgpool):
    return f"blocks{n_last_blocks}" + ("_avgpool" if avgpool else "")


def head_name(n_last_blocks, avgpool, lr):
    return f"{group_name(n_last_blocks, avgpool)}_lr{lr:g}"


def linear_input(blocks_cls, patch_mean, n_last_blocks, avgpool):
    """(B, n*D [+ D]) input of a head: cls of the last n blocks [+ mean patch token]."""
    x = blocks_cls[:, -n_last_blocks:].reshape(blocks_cls.shape[0], -1)
    return jnp.concatenate([x, patch_mean], axis=1) if avgpool else x


def init_heads(rng, groups, embed_dim, num_classes, num_lrs):
    """{group: {"kernel": (num_lrs, in, C) ~ N(0, 0.01^2), "bias": (num_lrs, C) zeros}}."""
    heads = {}
    for (n_last_blocks, avgpool), key in zip(groups, jax.random.split(rng, len(groups))):
        in_dim = embed_dim * (n_last_blocks + avgpool)
        heads[group_name(n_last_blocks, avgpool)] = {
            "kernel": 0.01 * jax.random.normal(key, (num_lrs, in_dim, num_classes)),
            "bias": jnp.zeros((num_lrs, num_classes)),
        }
    return heads


def head_logits(heads, groups, blocks_cls, patch_mean):
    """{group: (B, num_lrs, C) logits} of every head."""
    logits = {}
    for n_last_blocks, avgpool in groups:
        head = heads[group_name(n_last_blocks, avgpool)]
        x = linear_input(blocks_cls, patch_mean, n_last_blocks, avgpool)
        logits[group_name(n_last_blocks, avgpool)] = (
            jnp.einsum("bi,hic->bhc", x, head["kernel"], precision=jax.lax.Precision.HIGHEST)
            + head["bias"])
    return logits


def make_optimizer(lrs, batch_size, total_steps):
    """SGD momentum 0.9 with a cosine schedule to 0; head h of every group at lrs[h]*batch/256."""
    scales = jnp.asarray(lrs, jnp.float32) * batch_size / 256

    def per_head_lr(updates, params=None):
        del params
        return jax.tree.map(lambda u: u * scales.reshape(-1, *(1,) * (u.ndim - 1)), updates)

    return optax.chain(
        optax.sgd(optax.cosine_decay_schedule(1.0, total_steps), momentum=0.9),
        optax.stateless(per_head_lr))


@functools.partial(jax.jit, static_argnames=("groups", "optimizer"), donate_argnums=(0, 1))
def _train_step(heads, opt_state, blocks_cls, patch_mean, labels, *, groups, optimizer):
    def loss_fn(heads):
        logits = head_logits(heads, groups, blocks_cls, patch_mean)
        return sum(optax.softmax_cross_entropy_with_integer_labels(
            group_logits, labels[:, None]).mean(axis=0).sum() for group_logits in logits.values())

    loss, grads = jax.value_and_grad(loss_fn)(heads)
    updates, opt_state = optimizer.update(grads, opt_state, heads)
    return optax.apply_updates(heads, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("groups",))
def _correct(heads, blocks_cls, patch_mean, labels, valid, *, groups):
    """{group: (num_lrs, 2)} correct top-1 and top-5 counts of one chunk."""
    counts = {}
    for name, logits in head_logits(heads, groups, blocks_cls, patch_mean).items():
        _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))  # (B, H, 5)
        hits = (top == labels[:, None, None]) & valid[:, None, None]
        counts[name] = jnp.stack([hits[..., 0].sum(0), hits.any(-1).sum(0)], axis=-1)
    return counts


def evaluate_heads(heads, groups, features, labels, chunk_size=1024):
    """{group: (num_lrs, 2) [top-1, top-5] accuracy in percent} on `features`."""
    total = None
    for start in range(0, len(labels), chunk_size):
        count = min(chunk_size, len(labels) - start)
        pad = chunk_size - count
        chunk = [np.pad(features[name][start:start + count],
                        [(0, pad)] + [(0, 0)] * (features[name].ndim - 1)) for name in FEATURES]
        counts = _correct(heads, *chunk, np.pad(labels[start:start + count], (0, pad)),
                          np.arange(chunk_size) < count, groups=groups)
        counts = jax.tree.map(np.asarray, counts)
        total = counts if total is None else jax.tree.map(np.add, total, counts)
    return {name: 100.0 * value / len(labels) for name, value in total.items()}


def _check(features, labels, what, max_blocks):
    missing = [name for name in FEATURES if name not in features]
    if missing:
        raise ValueError(f"{what} features lack {missing}; extract them with "
                         f"features={FEATURES}")
    labels = np.asarray(labels)
    if len(labels) != len(features["blocks_cls"]) or not len(labels):
        raise ValueError(f"{what}: {len(labels)} labels for {len(features['blocks_cls'])} "
                         "feature rows")
    if labels.min() < 0:
        raise ValueError(f"{what}: {int((labels < 0).sum())} images have no label (-1); the "
                         "linear probe needs labelled images")
    if features["blocks_cls"].shape[1] < max_blocks:
        raise ValueError(f"{what} features hold {features['blocks_cls'].shape[1]} blocks, the "
                         f"grid needs {max_blocks}")
    return labels.astype(np.int32)


def _index_stream(num_images, batch_size, rng):
    """Batches of indices from consecutive random permutations (an infinite shuffled sampler)."""
    order = np.empty(0, np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(num_images)])
        yield order[:batch_size]
        order = order[batch_size:]


def linear_probe(train_features, train_labels, val_features, val_labels, *,
                 num_classes=None, lrs=LEARNING_RATES, n_last_blocks_list=N_LAST_BLOCKS,
                 avgpool_list=AVGPOOL, epochs=EPOCHS, epoch_length=EPOCH_LENGTH,
                 batch_size=BATCH_SIZE, seed=0, progress=False):
    """Trains the grid of heads on cached features and scores them on val.

    `*_features` are dicts with "blocks_cls" (N, n, D) and "patch_mean" (N, D). Returns
    (results, heads): results are percentages, "linear/top1" and "linear/top5" of the best
    head on val, "linear/best_lr", "linear/best_n_last_blocks", "linear/best_avgpool" (1/0),
    and "linear/top1/<head>" for every head; heads are {group: {"kernel", "bias"}} with the
    learning rates along the first axis.
    """
    groups = tuple((int(n), bool(a)) for n in n_last_blocks_list for a in avgpool_list)
    max_blocks = max(n for n, _ in groups)
    train_labels = _check(train_features, train_labels, "train", max_blocks)
    val_labels = _check(val_features, val_labels, "val", max_blocks)
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    total_steps = epochs * epoch_length
    optimizer = make_optimizer(lrs, batch_size, total_steps)
    rng = np.random.default_rng(seed)
    heads = init_heads(jax.random.key(seed), groups, train_features["patch_mean"].shape[1],
                       num_classes, len(lrs))
    opt_state = optimizer.init(heads)
    indices = _index_stream(len(train_labels), batch_size, rng)
    bar = tqdm.trange(total_steps, desc="linear heads", unit="it", file=sys.stderr,
                      disable=not progress or jax.process_index() != 0)
    for step in bar:
        batch = next(indices)
        heads, opt_state, loss = _train_step(
            heads, opt_state, train_features["blocks_cls"][batch],
            train_features["patch_mean"][batch], train_labels[batch], groups=groups,
            optimizer=optimizer)
        if (step + 1) % epoch_length == 0:
            bar.set_postfix(loss=f"{float(loss):.4g}", epoch=(step + 1) // epoch_length)
    bar.close()
    accuracy = evaluate_heads(heads, groups, val_features, val_labels)
    results, best = {}, None
    for n_last_blocks, avgpool in groups:
        for lr, (top1, top5) in zip(lrs, accuracy[group_name(n_last_blocks, avgpool)]):
            results[f"linear/top1/{head_name(n_last_blocks, avgpool, lr)}"] = float(top1)
            if best is None or top1 > best[0]:
                best = (float(top1), float(top5), n_last_blocks, avgpool, lr)
    top1, top5, n_last_blocks, avgpool, lr = best
    summary = {"linear/top1": top1, "linear/top5": top5, "linear/best_lr": float(lr),
               "linear/best_n_last_blocks": float(n_last_blocks),
               "linear/best_avgpool": float(avgpool)}
    return {**summary, **results}, heads


def linear_eval(model, params, train_source, val_source, *, image_size, resize_size,
                batch_size=256, train_batch_size=BATCH_SIZE, epochs=EPOCHS,
                epoch_length=EPOCH_LENGTH, lrs=LEARNING_RATES, n_last_blocks_list=N_LAST_BLOCKS,
                avgpool_list=AVGPOOL, dtype=jnp.float32, num_workers=0, seed=0, progress=True):
    """Linear-probe accuracy of a backbone: features of both sources through the eval
    transform (`batch_size` images per forward), then `linear_probe` (`train_batch_size` per
    SGD step). Returns the results dict of `linear_probe`."""
    common = dict(features=FEATURES, n_last_blocks=max(n_last_blocks_list),
                  image_size=image_size, resize_size=resize_size, batch_size=batch_size,
                  dtype=dtype, num_workers=num_workers, progress=progress)
    train = extract.extract_source(model, params, train_source, desc="linear train", **common)
    val = extract.extract_source(model, params, val_source, desc="linear val", **common)
    results, _ = linear_probe(
        train, train["label"], val, val["label"], lrs=lrs, n_last_blocks_list=n_last_blocks_list,
        avgpool_list=avgpool_list, epochs=epochs, epoch_length=epoch_length,
        batch_size=train_batch_size, seed=seed, progress=progress)
    return results


def _define(flag_values):
    cli_flags.define_eval_flags(flag_values)
    cli_flags.define_source_flags(flag_values, train="labelled source to train the heads on",
                                  val="labelled source to pick and score heads")
    flags.DEFINE_integer("epochs", EPOCHS, "epochs of head training", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("epoch_length", EPOCH_LENGTH, "iterations per epoch", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("train_batch_size", BATCH_SIZE, "features per SGD step (lr scales "
                         "with it / 256)", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_string("lrs", ",".join(f"{lr:g}" for lr in LEARNING_RATES),
                        "comma-separated base learning rates", flag_values=flag_values)
    flags.DEFINE_string("n_last_blocks", ",".join(map(str, N_LAST_BLOCKS)),
                        "comma-separated block counts", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "seed of the head init and the batch order",
                         flag_values=flag_values)


def main(argv=None):
    args = cli.parse(argv, _define,
                     "Linear-probe accuracy of a backbone (the DINOv2 grid of heads).")
    model, params = cli_flags.load_model(args)
    results = linear_eval(
        model, params, args.train, args.val, image_size=args.size,
        resize_size=args.resize_size or extract.default_resize_size(args.size),
        batch_size=args.batch_size, train_batch_size=args.train_batch_size, epochs=args.epochs,
        epoch_length=args.epoch_length, lrs=cli_flags.number_list(args, "lrs", float),
        n_last_blocks_list=cli_flags.number_list(args, "n_last_blocks"), dtype=args.dtype,
        num_workers=args.num_workers, seed=args.seed)
    cli_flags.report(results, args, train=args.train, val=args.val, epochs=args.epochs,
                     epoch_length=args.epoch_length, train_batch_size=args.train_batch_size)


if __name__ == "__main__":
    cli.run(main)
