"""Sequence packing of token groups, and the batch-subset drop path that runs on them.

A `PackLayout` packs the rows (crops) of several token groups (e.g. the student's global and
local crops, of different lengths) into equal sequences with one static block-diagonal segment
layout, so that a transformer block runs one attention call and one set of matmuls over all
groups; `plan_packing` picks the layout with the fewest padding tokens.

Drop path is the reference's batch-subset stochastic depth (`dinov2/layers/block.py`,
`drop_add_residual_stochastic_depth` and its list variant): a branch runs on a random subset of
S = `drop_path_keep_count(b, rate)` rows only and is added back to them scaled by b / S. S is
static, so shapes are too. `drop_path_add` is one group; `packed_drop_path_add` packs the kept
rows of all groups and runs the branch once. See docs/reference.md, Model.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def drop_path_keep_count(batch, rate):
    """The reference's drop-path subset size S = max(int(b * (1 - rate)), 1); b if rate <= 0."""
    return max(int(batch * (1 - rate)), 1) if rate > 0 else batch


def drop_path_add(x, branch, rate, rng):
    """x + branch(x) with the batch-subset drop path; no drop when `rng` is None or rate <= 0.

    Keeps a random subset of S = drop_path_keep_count(b, rate) samples, computes the branch on
    them only, and adds it back scaled by b / S.
    """
    if rng is None or rate <= 0:
        return x + branch(x)
    batch = x.shape[0]
    keep = drop_path_keep_count(batch, rate)
    kept = jax.random.permutation(rng, batch)[:keep]
    residual = branch(x[kept]) * jnp.asarray(batch / keep, x.dtype)
    return x.at[kept].add(residual)


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """A static plan that packs the rows (crops) of token groups into equal sequences.

    Group g has `rows[g]` rows of `lengths[g]` tokens. Sequence s holds its consecutive rows
    s*k .. s*k + k - 1, k = `slots[g]` = ceil(rows[g] / sequences), the groups one after
    another, so all sequences share one segment layout (`segment_lengths`, one segment per
    row). Packing is a reshape and a concatenation along the tokens, so rows sharded over d
    devices stay on their device when d divides `sequences`. Slots past a group's last row are
    padding rows of zeros, segments of their own whose outputs are dropped. For image-major
    groups (row = image * crops + crop) a sequence holds crops of one image.
    """
    rows: tuple[int, ...]
    lengths: tuple[int, ...]
    sequences: int

    @property
    def slots(self):
        return tuple(-(-n // self.sequences) for n in self.rows)

    @property
    def sequence_length(self):
        return sum(k * t for k, t in zip(self.slots, self.lengths))

    @property
    def padding_tokens(self):
        return sum((k * self.sequences - n) * t
                   for n, k, t in zip(self.rows, self.slots, self.lengths))

    @property
    def segment_lengths(self):
        return sum(((t,) * k for k, t in zip(self.slots, self.lengths)), ())

    def pack(self, groups):
        """Groups of (rows[g], lengths[g], C) -> (sequences, sequence_length, C)."""
        packed = []
        for x, k, t in zip(groups, self.slots, self.lengths):
            x = jnp.pad(x, ((0, k * self.sequences - x.shape[0]), (0, 0), (0, 0)))
            packed.append(x.reshape(self.sequences, k * t, x.shape[-1]))
        return jnp.concatenate(packed, axis=1)

    def unpack(self, packed):
        """The inverse of `pack`: the groups, without the padding rows."""
        splits = np.cumsum([k * t for k, t in zip(self.slots, self.lengths)])[:-1]
        return [x.reshape(k * self.sequences, t, x.shape[-1])[:n]
                for x, n, k, t in zip(jnp.split(packed, splits, axis=1), self.rows, self.slots,
                                      self.lengths)]


def plan_packing(rows, lengths, max_length=None):
    """The PackLayout with the fewest padding tokens, sequences no longer than `max_length`.

    Ties go to shorter sequences. `max_length` defaults to the length of the layout with
    gcd(rows) sequences, the shortest one without padding rows (which is then the plan).
    """
    rows, lengths = tuple(rows), tuple(lengths)
    if max_length is None:
        max_length = PackLayout(rows, lengths, math.gcd(*rows)).sequence_length
    layouts = (PackLayout(rows, lengths, p) for p in range(1, max(rows) + 1))
    return min((layout for layout in layouts if layout.sequence_length <= max_length),
               key=lambda layout: (layout.padding_tokens, layout.sequence_length))


def packed_drop_path_add(groups, branch, rate, rngs, max_length):
    """Each group plus `branch(packed, segment_lengths)` run once on the kept rows of all groups.

    Batch-subset drop path per group: a random subset of S = drop_path_keep_count(b, rate)
    rows, drawn with the group's key in `rngs` as `drop_path_add` draws it, is packed with the
    other groups' kept rows into sequences no longer than `max_length`; the branch output is
    added back to those rows scaled by b / S.
    """
    kept = [jax.random.permutation(rng, x.shape[0])[:drop_path_keep_count(x.shape[0], rate)]
            for x, rng in zip(groups, rngs)]
    layout = plan_packing([k.shape[0] for k in kept], [x.shape[1] for x in groups], max_length)
    residuals = layout.unpack(branch(layout.pack([x[k] for x, k in zip(groups, kept)]),
                                     layout.segment_lengths))
    return [x.at[k].add(y * jnp.asarray(x.shape[0] / k.shape[0], x.dtype))
            for x, k, y in zip(groups, kept, residuals)]
