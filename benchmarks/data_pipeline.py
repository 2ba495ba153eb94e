"""Input pipeline throughput for the ViT-L/14 multi-crop recipe, against the reference.

  python benchmarks/data_pipeline.py --images DIR [--batch_size 32] [--num_workers N]
      [--rounds 4] [--batches_per_round 2] [--batches 16]

Runs dinov2_jax's Grain training pipeline on the JPEGs of DIR (2 x 224 + 8 x 98 crops,
iBOT masks at patch 14, normalised float32 batches) in-process, alternating in rounds with
the reference augmentation on the same files (the official
`dinov2.data.augmentations.DataAugmentationDINO` if importable, else the same recipe built
from torchvision transforms; PIL decoding; torch single-threaded) when torch and torchvision
are installed; then the pipeline again with mp_prefetch workers.

Throughput per core is images per CPU-second (user + system time of the main process and of
the worker processes), which depends little on what else the machine runs; images/s is
wall-clock (for the workers row, from an uninterrupted run). The ratio
compares dinov2_jax's images per core (decode, augmentation, collation, masks, normalisation,
and for the workers row the transfer to the main process, included) with the reference's
(decode and augmentation only).
"""
import glob
import multiprocessing
import os
import time

from absl import flags

from dinov2_jax import cli, configs
from dinov2_jax.data import pipeline

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def config_for(images_dir: str, batch_size: int, num_workers: int):
    """The vitl14 recipe's crops (224 px global, eight 98 px local, patch 14) on `images_dir`."""
    config = configs.large_scale_recipe("vit_large")
    config.train.update(dataset=f"folder:{images_dir}", batch_size=batch_size, seed=0,
                        num_workers=num_workers)
    return config


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live child processes (Linux /proc)."""
    total = 0
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def wait_until_workers_idle(poll_s: float = 0.25, timeout_s: float = 120) -> float:
    """Waits until the worker processes stop using CPU (their buffers are full); returns their
    CPU seconds so far."""
    last = _children_cpu_seconds()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        now = _children_cpu_seconds()
        if now - last < 0.02:
            return now
        last = now
    return last


class Timer:
    """Accumulates images, wall seconds and CPU seconds of this process."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.images = 0

    def measure(self, fn, images: int) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.images += images

    def row(self, batch_size: int | None, wall: float | None = None) -> dict:
        wall = self.wall if wall is None else wall
        return {"batches/s": self.images / batch_size / wall if batch_size else float("nan"),
                "images/s": self.images / wall, "cpu_s": self.cpu,
                "images/s/core": self.images / self.cpu}


def train_iterator(images_dir: str, batch_size: int, num_workers: int):
    return pipeline.make_train_iterator(config_for(images_dir, batch_size, num_workers),
                                        process_index=0, process_count=1)


def take(iterator, n: int):
    return lambda: [next(iterator) for _ in range(n)]


def _reference_augmentation():
    import torch
    from torchvision import transforms
    torch.set_num_threads(1)
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    try:
        from dinov2.data.augmentations import DataAugmentationDINO
        return "official dinov2 DataAugmentationDINO", DataAugmentationDINO(
            (0.32, 1.0), (0.05, 0.32), 8, global_crops_size=224, local_crops_size=98)
    except ImportError:
        pass
    bicubic = transforms.InterpolationMode.BICUBIC
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    color = transforms.Compose([
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2)])

    def blur(p):
        return transforms.RandomApply([transforms.GaussianBlur(9, (0.1, 2.0))], p=p)

    def geometric(size, scale):
        return transforms.Compose([transforms.RandomResizedCrop(size, scale=scale,
                                                                interpolation=bicubic),
                                   transforms.RandomHorizontalFlip(0.5)])

    global1 = transforms.Compose([geometric(224, (0.32, 1.0)), color, blur(0.0), normalize])
    global2 = transforms.Compose([geometric(224, (0.32, 1.0)), color, blur(0.9),
                                  transforms.RandomSolarize(128, p=0.2), normalize])
    local = transforms.Compose([geometric(98, (0.05, 0.32)), color, blur(0.5), normalize])
    return "torchvision re-implementation", lambda image: {
        "global_crops": [global1(image), global2(image)],
        "local_crops": [local(image) for _ in range(8)]}


def reference_fn(augmentation, paths: list[str]):
    from PIL import Image

    def run():
        for path in paths:
            with open(path, "rb") as f:
                augmentation(Image.open(f).convert("RGB"))
    return run


def _define(flag_values):
    flags.DEFINE_string("images", None, "folder of JPEGs", flag_values=flag_values,
                        required=True)
    flags.DEFINE_integer("batch_size", 32, "images per batch", flag_values=flag_values)
    flags.DEFINE_integer("rounds", 4, "alternating in-process / reference rounds",
                         flag_values=flag_values)
    flags.DEFINE_integer("batches_per_round", 2, "batches per round", flag_values=flag_values)
    flags.DEFINE_integer("batches", 16, "batches of the uninterrupted wall-clock run with "
                         "workers", flag_values=flag_values)
    flags.DEFINE_integer("num_workers", os.cpu_count(), "data worker processes",
                         flag_values=flag_values)


def main(argv):
    args = cli.parse(argv, _define, __doc__)
    paths = sorted(p for p in glob.glob(os.path.join(args.images, "**", "*"), recursive=True)
                   if p.lower().endswith((".jpg", ".jpeg")))
    if not paths:
        raise SystemExit(f"--images {args.images}: no JPEG files found")

    # The in-process pipeline, the reference and the pipeline with workers take turns on the
    # same files, so that all three see the same machine load. The workers' CPU time is read
    # when they are idle with full buffers, before the first and after the last turn, so it
    # covers exactly the batches taken.
    try:
        reference_name, augmentation = _reference_augmentation()
    except ImportError as e:
        reference_name, augmentation = None, None
        print(f"reference not timed: {e}")
    in_process, with_workers, reference = Timer(), Timer(), Timer()
    in_process_iterator = train_iterator(args.images, args.batch_size, 0)
    next(in_process_iterator)
    workers_iterator = None
    if args.num_workers > 0:
        workers_iterator = train_iterator(args.images, args.batch_size, args.num_workers)
        take(workers_iterator, 2 * args.num_workers + 1)()
        workers_cpu = -wait_until_workers_idle()
    per_round = args.batch_size * args.batches_per_round
    for r in range(args.rounds):
        in_process.measure(take(in_process_iterator, args.batches_per_round), per_round)
        if augmentation is not None:
            chunk = [paths[(r * per_round + i) % len(paths)] for i in range(per_round)]
            reference.measure(reference_fn(augmentation, chunk), per_round)
        if workers_iterator is not None:
            with_workers.measure(take(workers_iterator, args.batches_per_round), per_round)
    rows = [("dinov2_jax grain, in-process", 0, in_process.row(args.batch_size))]
    if workers_iterator is not None:
        with_workers.cpu += workers_cpu + wait_until_workers_idle()
        # Wall-clock throughput from an uninterrupted run, after emptying the buffers.
        take(workers_iterator, 2 * args.num_workers + 1)()
        wall = time.perf_counter()
        take(workers_iterator, args.batches)()
        wall = (time.perf_counter() - wall) * with_workers.images / (args.batches * args.batch_size)
        workers_iterator.close()
        rows.append(("dinov2_jax grain, mp_prefetch", args.num_workers,
                     with_workers.row(args.batch_size, wall=wall)))
    if augmentation is not None:
        rows.append((f"reference: {reference_name}, 1 thread", "-", reference.row(None)))

    print(f"\n{len(paths)} JPEGs in {args.images}; recipe 2x224 + 8x98, patch 14 masks, "
          f"batch {args.batch_size}; {os.cpu_count()} CPU cores\n")
    print(f"| {'pipeline':<58} | workers | batches/s | images/s | CPU s | images/s/core |")
    print(f"|{'-' * 60}|---------|-----------|----------|-------|---------------|")
    for name, workers, r in rows:
        print(f"| {name:<58} | {workers!s:>7} | {r['batches/s']:9.2f} | {r['images/s']:8.1f} | "
              f"{r['cpu_s']:5.1f} | {r['images/s/core']:13.1f} |")
    if augmentation is not None:
        print()
        for name, _, r in rows[:-1]:
            print(f"ratio {name} / reference, images/s per core: "
                  f"{r['images/s/core'] / rows[-1][2]['images/s/core']:.2f}x")


if __name__ == "__main__":
    cli.run(main)
