"""Attentive probe: one learned query cross-attends to frozen patch tokens, then a linear
classifier, as in V-JEPA's attentive classifier (one query, one block) and DINOv3's
attentive evaluation.

Head (V-JEPA's `AttentivePooler` + `AttentiveClassifier` with one query and one block):
q = query (1, D), trunc-normal(0.02); q = q + CrossAttention(q, LayerNorm(tokens));
q = q + MLP(LayerNorm(q)) (4x hidden, exact GELU); logits = Linear(q). Tokens are the last
block's normed patch tokens (plus the cls token with `with_cls`), cached once per image
through the eval transform (resize, center crop), as the linear probe does. Trained with
AdamW (lr 1e-3, weight decay 0.05) and poly decay after a linear warm-up, on the
cross-entropy; reports top-1 and top-5 on val in percent.

Memory: the cache holds N x (S/p)^2 x D floats per split (`cache_dtype` bfloat16 halves it).

  python -m dinov2_jax.eval.attentive --weights W --train SRC --val SRC [--size 224]
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from dinov2_jax import cli
from dinov2_jax.configs import ConfigError
from dinov2_jax.eval import cli_flags, dense, extract

EPOCHS = 20
BATCH_SIZE = 256
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.1


class AttentiveHead(nn.Module):
    """Cross-attention pooling with one learned query and one block, then a classifier."""
    num_classes: int
    num_heads: int = 8
    with_cls: bool = False
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, patch, cls, train):
        del train  # No dropout or batch norm.
        tokens = jnp.concatenate([cls[:, None], patch], axis=1) if self.with_cls else patch
        dim = tokens.shape[-1]
        heads = self.num_heads if dim % self.num_heads == 0 else 1
        query = self.param("query", nn.initializers.truncated_normal(0.02), (1, 1, dim))
        query = jnp.broadcast_to(query, (tokens.shape[0], 1, dim))
        keys = nn.LayerNorm(epsilon=1e-6, name="norm1")(tokens)
        query = query + nn.MultiHeadDotProductAttention(heads, name="xattn")(query, keys)
        hidden = nn.LayerNorm(epsilon=1e-6, name="norm2")(query)
        hidden = nn.Dense(int(dim * self.mlp_ratio), name="fc1")(hidden)
        hidden = nn.Dense(dim, name="fc2")(jax.nn.gelu(hidden, approximate=False))
        query = query + hidden
        return nn.Dense(self.num_classes, name="linear")(query[:, 0])


@dataclasses.dataclass
class _Tokens:
    """Cached tokens and labels in the shape `dense.train_head` reads."""
    patch: np.ndarray
    cls: np.ndarray
    targets: np.ndarray


def _cross_entropy(logits, labels, step):
    del step  # The same loss at every step.
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels))


@functools.partial(jax.jit, static_argnames=("head",))
def _topk_hits(head, variables, patch, cls, labels):
    """Top-1 and top-5 hit counts of a batch."""
    logits = head.apply(variables, patch.astype(jnp.float32), cls.astype(jnp.float32),
                        train=False)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return jnp.sum(top5[:, 0] == labels), jnp.sum(jnp.any(top5 == labels[:, None], axis=1))


def train_probe(train, train_labels, val, val_labels, *, num_classes, epochs=EPOCHS,
                batch_size=BATCH_SIZE, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                num_heads=8, with_cls=False, seed=0, progress=True):
    """Trains the head on {"patch": (N, P, D), "cls": (N, D)} features and their labels and
    scores it on val; returns ({"attentive/top1", "attentive/top5", "attentive/train_loss"},
    (head, variables))."""
    train_labels, val_labels = np.asarray(train_labels), np.asarray(val_labels)
    for name, labels in (("train", train_labels), ("val", val_labels)):
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
            raise ConfigError(f"{name} labels must be in [0, {num_classes}); unlabelled images "
                              "(-1) cannot train or score a classifier")
    head = AttentiveHead(num_classes, num_heads, with_cls)
    steps = max(1, epochs * len(train_labels) // batch_size)
    data = _Tokens(train["patch"], train["cls"], train_labels.astype(np.int32))
    variables, train_loss = dense.train_head(
        head, _cross_entropy, data, steps=steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_steps=int(WARMUP_FRACTION * steps), seed=seed,
        progress=progress, desc="attentive head")
    top1 = top5 = 0
    for start in range(0, len(val_labels), batch_size):
        rows = slice(start, start + batch_size)
        hits = _topk_hits(head, variables, jnp.asarray(val["patch"][rows]),
                          jnp.asarray(val["cls"][rows]), jnp.asarray(val_labels[rows], jnp.int32))
        top1, top5 = top1 + int(hits[0]), top5 + int(hits[1])
    count = max(len(val_labels), 1)
    return ({"attentive/top1": 100.0 * top1 / count, "attentive/top5": 100.0 * top5 / count,
             "attentive/train_loss": train_loss}, (head, variables))


def evaluate(model, params, train_source, val_source, *, image_size=224, resize_size=None,
             batch_size=256, epochs=EPOCHS, head_batch_size=BATCH_SIZE, lr=LEARNING_RATE,
             weight_decay=WEIGHT_DECAY, num_heads=8, with_cls=False, cache_dtype=np.float32,
             dtype=None, num_workers=0, seed=0, progress=True):
    """Top-1/top-5 of the attentive probe trained on `train_source`, scored on `val_source`
    (labelled image sources, e.g. folder:/x or demo:val)."""
    common = dict(features=("patch", "cls"), image_size=image_size, resize_size=resize_size,
                  batch_size=batch_size, dtype=dtype, num_workers=num_workers,
                  progress=progress)
    train = extract.extract_source(model, params, train_source, desc="attentive train", **common)
    val = extract.extract_source(model, params, val_source, desc="attentive val", **common)
    num_classes = int(max(train["label"].max(initial=-1), val["label"].max(initial=-1))) + 1
    if num_classes < 2:
        raise ConfigError("the attentive probe needs labelled sources with 2 or more classes")
    cast = {name: train[name].astype(cache_dtype) for name in ("patch", "cls")}
    results, _ = train_probe(cast, train["label"], val, val["label"], num_classes=num_classes,
                             epochs=epochs, batch_size=head_batch_size, lr=lr,
                             weight_decay=weight_decay, num_heads=num_heads,
                             with_cls=with_cls, seed=seed, progress=progress)
    return results


def _define(flag_values):
    cli_flags.define_eval_flags(flag_values)
    flags.DEFINE_string("train", None, "labelled training source (folder:/x, tfds:..., demo)",
                        required=True, flag_values=flag_values)
    flags.DEFINE_string("val", None, "labelled validation source", required=True,
                        flag_values=flag_values)
    flags.DEFINE_integer("epochs", EPOCHS, "passes over the cached training features",
                         flag_values=flag_values)
    flags.DEFINE_integer("head_batch_size", BATCH_SIZE, "images per head step",
                         flag_values=flag_values)
    flags.DEFINE_float("lr", LEARNING_RATE, "peak AdamW learning rate", flag_values=flag_values)
    flags.DEFINE_float("weight_decay", WEIGHT_DECAY, "AdamW weight decay",
                       flag_values=flag_values)
    flags.DEFINE_integer("num_heads", 8, "attention heads of the pooling block (1 when they "
                         "do not divide the width)", flag_values=flag_values)
    flags.DEFINE_boolean("with_cls", False, "let the query attend to the cls token too",
                         flag_values=flag_values)
    flags.DEFINE_enum("cache_dtype", "float32", ("float32", "bfloat16"), "dtype of the cached "
                      "tokens on the host", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "seed of the head init and batch order",
                         flag_values=flag_values)


def main(argv=None):
    args = cli.parse(argv, _define, "Attentive probe (cross-attention pooling) of a backbone.")
    model, params = cli_flags.load_model(args)
    results = evaluate(model, params, args.train, args.val, image_size=args.size,
                       resize_size=args.resize_size, batch_size=args.batch_size,
                       epochs=args.epochs, head_batch_size=args.head_batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, num_heads=args.num_heads,
                       with_cls=args.with_cls, cache_dtype=jnp.dtype(args.cache_dtype),
                       dtype=jnp.dtype(args.dtype), num_workers=args.num_workers,
                       seed=args.seed)
    dense.report(results, args, "attentive", train=args.train, val=args.val,
                 epochs=args.epochs)


if __name__ == "__main__":
    cli.run(main)
