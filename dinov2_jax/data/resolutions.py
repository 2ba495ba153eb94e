"""Mixed-resolution batches (`crops.resolutions`), as in DINOv3's high-resolution adaptation
(`dinov3/data/meta_loaders.py`): every batch has one (global, local) crop size pair, drawn
with the given probabilities.

The draw for batch k is a pure function of (train.seed, k): every host draws the same without
talking to the others, and since batch k is the one of step k, a resumed run (whose data
iterator restarts at its step) draws what the uninterrupted run drew. Each pair is one shape
of the jitted train step, compiled once.
"""
import numpy as np

# Mixes the draw's seed apart from the other consumers of train.seed (b"res" in ASCII).
_STREAM = 0x726573


def from_config(config):
    """((global_size, local_size, probability), ...) of a validated config; one pair with
    probability 1 (crops.global_crops_size, crops.local_crops_size) when it sets none."""
    crops = config.crops
    if not crops.resolutions:
        return ((int(crops.global_crops_size), int(crops.local_crops_size), 1.0),)
    return tuple((int(g), int(l), float(p)) for g, l, p in crops.resolutions)


def batch_resolution(seed, batch_index, probabilities):
    """The index of the size pair of batch `batch_index` (a pure function of its arguments)."""
    if len(probabilities) == 1:
        return 0
    rng = np.random.default_rng([int(seed), _STREAM, int(batch_index)])
    weights = np.asarray(probabilities, np.float64)
    return int(rng.choice(len(weights), p=weights / weights.sum()))


class TagResolution:
    """(index, record) -> the record with "resolution": the size pair index of its batch
    (records [k * batch_size, (k + 1) * batch_size) of the host's stream form batch k)."""

    def __init__(self, seed, batch_size, probabilities):
        self._seed, self._batch_size = seed, batch_size
        self._probabilities = tuple(probabilities)

    def __call__(self, index, record):
        return {**record, "resolution": batch_resolution(self._seed, index // self._batch_size,
                                                         self._probabilities)}
