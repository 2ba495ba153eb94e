"""Grain input pipelines: the multi-crop training stream and the eval (k-NN/features) stream.

Training (make_train_dataset / make_train_iterator), per host:

  source -> [process_index::process_count] -> decode (a bad record is skipped: the next
  record of the host's slice takes its place) -> seeded shuffle, repeated forever ->
  [with crops.resolutions: tag each record with its batch's crop sizes, data/resolutions.py] ->
  random_map(multi-crop, per-record rng) -> batch(collate crop-major + iBOT masks per mask
  group, normalise) -> to_iter_dataset -> bad-record accounting -> mp_prefetch(num_workers)

Batching happens on the MapDataset, so a batch is a pure function of (seed, host, step): the
stream is the same for any number of workers, and `get_state()`/`set_state()` resume it
exactly. The masks of a group use a `random.Random` seeded from the per-record seeds of the
group's images, so they are part of that pure function too.

The batch, for B = config.train.batch_size / process_count images on this host and G mask
groups (normally one per local device; B/G images each):
  "global_crops" (2, B, H, W, 3) float32, "local_crops" (n_local, B, h, w, 3) float32,
  "masks" (2, B, N) bool, "mask_indices" (G, U) int32, "masks_weight" (G, U) float32,
with U the reference's upperbound for B/G images (masking.mask_upperbound); with DINOv3's
crops.gram_teacher_crops_size S also "gram_teacher_crops" (2, B, S, S, 3) float32.

Bad records (unreadable, corrupt, truncated, zero-byte, undecodable) are logged with their
key (the file path or source[index]) and counted; the counts live in the iterator state
(`bad_record_stats(iterator)` sums them over workers). When more than `max_bad_fraction` of
the records read by a worker failed, once it has read at least `bad_fraction_min_records`,
the iterator raises TooManyBadRecordsError naming examples.

The training stream reads a validated config (defaults in dinov2_jax.configs): train.dataset,
train.batch_size, train.seed, train.num_workers (negative: min(cpu count, 32)),
train.max_bad_fraction, train.bad_fraction_min_records, crops.*, student.patch_size,
ibot.mask_sample_probability and ibot.mask_ratio_min_max.
"""
import dataclasses
import functools
import os
import random
import threading
import time
from typing import Any

import grain
import grain.multiprocessing
import numpy as np
from absl import logging

from dinov2_jax.data import augment, masking, resolutions, sources

BAD_KEY = "_bad_records"
_MAX_CONSECUTIVE_BAD = 100
_LOGGED_BAD_PER_PROCESS = 100
_EXAMPLES_KEPT = 5
_bad_logged = 0


class TooManyBadRecordsError(RuntimeError):
    """Raised when the share of records that fail to read or decode exceeds the limit."""


def default_num_workers() -> int:
    return min(os.cpu_count() or 1, 32)


def _log_bad_record(key: str, reason: str) -> None:
    global _bad_logged
    _bad_logged += 1
    if _bad_logged <= _LOGGED_BAD_PER_PROCESS or _bad_logged % 1000 == 0:
        logging.warning("Skipping bad record %s: %s (%d skipped by this process so far)",
                        key, reason, _bad_logged)


def _format_examples(examples) -> str:
    return "; ".join(f"{key}: {reason}" for key, reason in examples)


class DecodedRecords(grain.MapDataset):
    """Decodes each record; a bad record is replaced by the next good one of the parent.

    Elements: {"image": (H, W, 3) uint8, "label": int, "key": str, "bad": ((key, reason), ...)}
    where "bad" lists the records skipped on the way (usually empty).
    """

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        bad = []
        for attempt in range(min(_MAX_CONSECUTIVE_BAD, len(self))):
            record = self._parent[(index + attempt) % len(self)]
            try:
                image = sources.decode_record(record)
            except sources.BadRecordError as e:
                bad.append((record["key"], str(e)))
                _log_bad_record(record["key"], str(e))
                continue
            return {"image": image, "label": record["label"], "key": record["key"],
                    "bad": tuple(bad)}
        raise TooManyBadRecordsError(
            f"{len(bad)} consecutive records starting at index {index} of this host's slice "
            f"failed to decode. Examples: {_format_examples(bad[:_EXAMPLES_KEPT])}")


class _FloatBatches:
    """Allocates float32 batch arrays, in shared memory once mp_prefetch asks for it (the
    worker then hands the batch to the main process without another copy)."""

    _shared_memory = False

    def enable_shared_memory_output(self) -> None:
        self._shared_memory = True

    def _float_array(self, shape) -> np.ndarray:
        if self._shared_memory:
            return grain.multiprocessing.SharedMemoryArray(shape, np.float32)
        return np.empty(shape, np.float32)

    def _normalized_stack(self, images, axis: int) -> np.ndarray:
        """Normalised float32 stack of uint8 images along `axis` (one pass per image)."""
        shape = list(images[0].shape)
        shape.insert(axis, len(images))
        out = self._float_array(tuple(shape))
        for i, image in enumerate(images):
            augment.normalize_into(out[(slice(None),) * axis + (i,)], image)
        return out


class BadRecordGuard(grain.IterDataset):
    """Counts the records read and skipped per batch; raises when too many were bad."""

    def __init__(self, parent: grain.IterDataset, max_bad_fraction: float, min_records: int,
                 batch_fn: _FloatBatches):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._min_records = min_records
        self._batch_fn = batch_fn

    def enable_shared_memory_output(self) -> None:
        """Called by mp_prefetch: the batches are then built in shared memory."""
        self._batch_fn.enable_shared_memory_output()

    def __iter__(self):
        return _BadRecordGuardIterator(self._parent.__iter__(), self._max_bad_fraction,
                                       self._min_records)


class _BadRecordGuardIterator(grain.DatasetIterator):

    def __init__(self, parent, max_bad_fraction: float, min_records: int):
        super().__init__(parent)
        self._max_bad_fraction = max_bad_fraction
        self._min_records = min_records
        self._records_read = 0
        self._bad_records = 0
        self._examples = []

    def __next__(self):
        batch = next(self._parent)
        bad = batch.pop(BAD_KEY)
        self._records_read += batch_size(batch) + len(bad)
        if bad:
            self._bad_records += len(bad)
            self._examples = (self._examples + [list(b) for b in bad])[:_EXAMPLES_KEPT]
            share = self._bad_records / self._records_read
            if self._records_read >= self._min_records and share > self._max_bad_fraction:
                raise TooManyBadRecordsError(
                    f"{self._bad_records} of {self._records_read} records ({share:.1%}) read by this "
                    f"data worker failed to read or decode, more than max_bad_fraction="
                    f"{self._max_bad_fraction}. Examples: {_format_examples(self._examples)}")
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "records_read": self._records_read,
                "bad_records": self._bad_records, "bad_examples": self._examples}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._records_read = state["records_read"]
        self._bad_records = state["bad_records"]
        self._examples = [list(e) for e in state["bad_examples"]]


def batch_size(batch: dict) -> int:
    """Images in a train or eval batch."""
    if "global_crops" in batch:
        return batch["global_crops"].shape[1]
    return batch["image"].shape[0]


def bad_record_stats(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """Records read and skipped so far, summed over workers, from the iterator's state."""
    totals = {"records_read": 0, "bad_records": 0, "bad_examples": []}

    def visit(node):
        if isinstance(node, dict):
            if "bad_records" in node and "records_read" in node:
                totals["records_read"] += node["records_read"]
                totals["bad_records"] += node["bad_records"]
                totals["bad_examples"] += node["bad_examples"]
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(iterator.get_state())
    return totals


# ---------------------------------------------------------------- training


class MultiCropRecord(grain.transforms.RandomMap):
    """Decoded record -> uint8 multi-crops and a seed for the masks of its batch; with several
    crop size pairs (`resolutions`), those of the record's "resolution"."""

    def __init__(self, specs: tuple[augment.MultiCropSpec, ...]):
        self._specs = specs

    def random_map(self, element, rng: np.random.Generator):
        mask_seed = int(rng.integers(2**63))
        resolution = element.get("resolution", 0)
        crops = augment.multi_crop(element["image"], rng, self._specs[resolution])
        return {**crops, "mask_seed": mask_seed, "bad": element["bad"], "resolution": resolution}


class TrainCollate(_FloatBatches):
    """Records -> the training batch (crop-major, normalised) with masks per mask group.

    `n_tokens` and `generators` are per crop size pair: the masks follow the batch's global
    crop size (its records' "resolution").
    """

    def __init__(self, n_tokens: tuple[int, ...], mask_groups: int, mask_ratio_min_max,
                 mask_probability: float, generators: tuple[masking.MaskingGenerator, ...]):
        self._n_tokens = n_tokens
        self._mask_groups = mask_groups
        self._mask_ratio_min_max = tuple(mask_ratio_min_max)
        self._mask_probability = mask_probability
        self._generators = generators

    def __call__(self, records) -> dict[str, np.ndarray]:
        b = len(records)
        resolution = records[0]["resolution"]
        if any(r["resolution"] != resolution for r in records):
            raise ValueError("a batch mixes crop sizes: its records were tagged for different "
                             "batches (the batch size of TagResolution and .batch differ)")
        n_tokens, generator = self._n_tokens[resolution], self._generators[resolution]
        group = b // self._mask_groups
        upperbound = masking.mask_upperbound(2 * group, n_tokens, self._mask_ratio_min_max,
                                             self._mask_probability)
        masks = np.zeros((2, b, n_tokens), bool)
        mask_indices = np.zeros((self._mask_groups, upperbound), np.int32)
        masks_weight = np.zeros((self._mask_groups, upperbound), np.float32)
        for g in range(self._mask_groups):
            members = records[g * group:(g + 1) * group]
            seed = np.random.SeedSequence([r["mask_seed"] for r in members]).generate_state(2)
            rng = random.Random(int(seed[0]) << 32 | int(seed[1]))
            group_masks = masking.sample_masks(2 * group, n_tokens, self._mask_ratio_min_max,
                                               self._mask_probability, generator, rng)
            masks[:, g * group:(g + 1) * group] = group_masks.reshape(2, group, n_tokens)
            mask_indices[g], masks_weight[g] = masking.padded_mask_indices(group_masks, upperbound)
        batch = {
            "global_crops": self._normalized_stack([r["global_crops"] for r in records], axis=1),
            "local_crops": self._normalized_stack([r["local_crops"] for r in records], axis=1),
            "masks": masks,
            "mask_indices": mask_indices,
            "masks_weight": masks_weight,
            BAD_KEY: [bad for r in records for bad in r["bad"]],
        }
        if "gram_teacher_crops" in records[0]:  # DINOv3's crops.gram_teacher_crops_size
            batch["gram_teacher_crops"] = self._normalized_stack(
                [r["gram_teacher_crops"] for r in records], axis=1)
        return batch


def _host(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Only for the defaults: the data code otherwise runs without jax.
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    return process_index, process_count


# One element is a whole batch: batches are made one at a time by the process that asks
# (the caller with num_workers=0, else each mp_prefetch worker, whose loop runs ahead).
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _prefetch(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers == 0:
        return ds
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                       per_worker_buffer_size=1),
                          worker_init_fn=functools.partial(_exit_with_trainer, os.getpid()))


def _exit_with_trainer(trainer_pid: int, worker_index: int, worker_count: int) -> None:
    """Worker start-up: a daemon thread ends this worker within a second of the trainer's
    death (a kill -9 leaves no time for the trainer to stop its workers itself)."""
    del worker_index, worker_count
    parent = os.getppid()  # the trainer, or a fork server that ends with it

    def watch():
        while True:
            try:
                os.kill(trainer_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            if os.getppid() != parent:  # re-parented: the trainer died (maybe not yet reaped)
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="exit-with-trainer").start()


def make_train_dataset(config, *, process_index: int | None = None,
                       process_count: int | None = None, mask_groups: int = 1,
                       source=None) -> grain.IterDataset:
    """The infinite training stream of this host (see the module docstring).

    `source` overrides config.train.dataset with an already opened source.
    """
    process_index, process_count = _host(process_index, process_count)
    global_batch = int(config.train.batch_size)
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by "
                         f"process_count={process_count}")
    local_batch = global_batch // process_count
    if mask_groups < 1 or local_batch % mask_groups:
        raise ValueError(f"local batch {local_batch} is not divisible by mask_groups={mask_groups}")
    spec = augment.MultiCropSpec.from_config(config.crops)
    mixture = resolutions.from_config(config)
    specs = tuple(dataclasses.replace(spec, global_crops_size=g, local_crops_size=l)
                  for g, l, _ in mixture)
    patch_size = config.student.patch_size
    collate = TrainCollate(
        n_tokens=tuple((s.global_crops_size // patch_size) ** 2 for s in specs),
        mask_groups=mask_groups, mask_ratio_min_max=config.ibot.mask_ratio_min_max,
        mask_probability=float(config.ibot.mask_sample_probability),
        generators=tuple(masking.make_mask_generator(s.global_crops_size, patch_size)
                        for s in specs))
    source = sources.open_source(config.train.dataset) if source is None else source
    host_records = grain.MapDataset.source(source)[process_index::process_count]
    if len(host_records) < local_batch:
        raise ValueError(f"host {process_index} has {len(host_records)} records, fewer than its "
                         f"batch of {local_batch}")
    seed = int(np.random.SeedSequence([int(config.train.seed), process_index])
               .generate_state(1)[0])
    num_workers = config.train.num_workers
    num_workers = default_num_workers() if num_workers < 0 else int(num_workers)
    ds = DecodedRecords(host_records).seed(seed).shuffle().repeat()
    if len(mixture) > 1:
        ds = ds.map_with_index(resolutions.TagResolution(
            config.train.seed, local_batch, [p for _, _, p in mixture]))
    ds = (ds.random_map(MultiCropRecord(specs))
          .batch(local_batch, drop_remainder=True, batch_fn=collate)
          .to_iter_dataset(_READ_OPTIONS))
    ds = BadRecordGuard(
        ds, max_bad_fraction=float(config.train.max_bad_fraction),
        min_records=int(config.train.bad_fraction_min_records),
        batch_fn=collate)
    return _prefetch(ds, num_workers)


def make_train_iterator(config, *, process_index: int | None = None,
                        process_count: int | None = None, mask_groups: int = 1,
                        source=None) -> grain.DatasetIterator:
    """Iterator over make_train_dataset; save/restore it with get_state()/set_state()."""
    return iter(make_train_dataset(config, process_index=process_index,
                                   process_count=process_count, mask_groups=mask_groups,
                                   source=source))


# ---------------------------------------------------------------- evaluation


class EvalRecord:
    """(index, record) -> eval-transformed uint8 image with label and index, or a bad marker."""

    def __init__(self, image_size: int, resize_size: int, process_index: int, process_count: int):
        self._image_size, self._resize_size = image_size, resize_size
        self._process_index, self._process_count = process_index, process_count

    def __call__(self, index: int, record: dict) -> dict:
        try:
            image = sources.decode_record(record)
        except sources.BadRecordError as e:
            _log_bad_record(record["key"], str(e))
            return {"bad": ((record["key"], str(e)),)}
        return {"image": augment.eval_transform(image, self._resize_size, self._image_size),
                "label": record["label"],
                "index": self._process_index + index * self._process_count, "bad": ()}


class EvalCollate(_FloatBatches):
    """Good records -> {"image", "label", "index"}; the bad ones are only reported."""

    def __init__(self, image_size: int):
        self._image_size = image_size

    def __call__(self, records) -> dict[str, np.ndarray]:
        good = [r for r in records if not r["bad"]]
        if good:
            images = self._normalized_stack([r["image"] for r in good], axis=0)
        else:
            images = np.zeros((0, self._image_size, self._image_size, 3), np.float32)
        return {"image": images,
                "label": np.asarray([r["label"] for r in good], np.int32),
                "index": np.asarray([r["index"] for r in good], np.int64),
                BAD_KEY: [bad for r in records for bad in r["bad"]]}


def make_eval_dataset(source, *, image_size: int = 224, resize_size: int = 256,
                      batch_size: int = 256, process_index: int | None = None,
                      process_count: int | None = None, num_workers: int = 0,
                      max_bad_fraction: float, bad_fraction_min_records: int
                      ) -> grain.IterDataset:
    """One pass over all records of this host's slice, in source order.

    The bad-record thresholds are the caller's (the training defaults live in
    `configs.default_config().train`).

    `source` is a source string or an opened source. Batches are
    {"image": (b, S, S, 3) float32, "label": (b,) int32, "index": (b,) int64 (position in the
    source)}; the last batch is smaller, and bad records are skipped (and counted).
    """
    process_index, process_count = _host(process_index, process_count)
    if isinstance(source, str):
        source = sources.open_source(source)
    collate = EvalCollate(image_size)
    ds = (grain.MapDataset.source(source)[process_index::process_count]
          .map_with_index(EvalRecord(image_size, resize_size, process_index, process_count))
          .batch(batch_size, drop_remainder=False, batch_fn=collate)
          .to_iter_dataset(_READ_OPTIONS))
    ds = BadRecordGuard(ds, max_bad_fraction=max_bad_fraction, min_records=bad_fraction_min_records,
                        batch_fn=collate)
    return _prefetch(ds, num_workers)


def make_eval_iterator(source, *, image_size: int = 224, resize_size: int = 256,
                       batch_size: int = 256, process_index: int | None = None,
                       process_count: int | None = None, num_workers: int = 0,
                       max_bad_fraction: float, bad_fraction_min_records: int
                       ) -> grain.DatasetIterator:
    """Iterator over make_eval_dataset."""
    return iter(make_eval_dataset(
        source, image_size=image_size, resize_size=resize_size, batch_size=batch_size,
        process_index=process_index, process_count=process_count, num_workers=num_workers,
        max_bad_fraction=max_bad_fraction, bad_fraction_min_records=bad_fraction_min_records))
