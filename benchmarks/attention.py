"""Times the attention backends at DINOv2 shapes, forward and forward+backward.

Per image the student sees 2 global crops of 1+R+256 tokens and 8 local crops of 1+R+49
tokens (ViT-*/14, 224 and 98 px, R registers): run as two batched calls (global, local) or
packed into one sequence of 2x257+8x50 = 914 tokens (954 with 4 registers) whose crops are
segments. Heads are those of ViT-S (6), ViT-L (16) and ViT-g (24), head dim 64.

Prints the device, a table of median times over >= 20 timed runs after warm-up, and the
packed-vs-separate comparison (packed fwd+bwd against the sum of the global and local calls).

  python benchmarks/attention.py              # every backend of this platform
  python benchmarks/attention.py --quick      # tiny sizes (CPU smoke run)
"""
import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dinov2_jax.models.attention import dot_product_attention

PLATFORM_BACKENDS = {"cpu": ("xla",), "gpu": ("xla", "cudnn", "pallas"),
                     "tpu": ("xla", "splash")}
HEAD_DIM = 64
GLOBAL_CROPS, LOCAL_CROPS = 2, 8


def crop_lengths(registers: int) -> tuple[int, int]:
    """Tokens of a global and a local crop: cls + registers + 16x16 or 7x7 patches."""
    return 1 + registers + 16 * 16, 1 + registers + 7 * 7


def median_ms(fn, args, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def time_backend(backend: str, sequences: int, tokens: int, heads: int, segment_lengths,
                 dtype, runs: int, warmup: int) -> tuple[float, float]:
    """Median forward and forward+backward milliseconds of one attention call."""
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (sequences, tokens, heads, HEAD_DIM)
    q, k, v, cotangent = (jax.random.normal(key, shape, dtype) for key in keys)

    def attention(q, k, v):
        return dot_product_attention(q, k, v, segment_lengths=segment_lengths, backend=backend)

    forward = jax.jit(attention)
    forward_backward = jax.jit(lambda q, k, v, g: jax.vjp(attention, q, k, v)[1](g))
    return (median_ms(forward, (q, k, v), runs, warmup),
            median_ms(forward_backward, (q, k, v, cotangent), runs, warmup))


def benchmark_rows(backends, heads_list, images_list, registers_list, dtype, runs, warmup):
    """One row per (heads, images, registers, backend, crops), crops in global/local/packed."""
    rows = []
    for heads, images, registers, backend in itertools.product(
            heads_list, images_list, registers_list, backends):
        global_len, local_len = crop_lengths(registers)
        packed = (global_len,) * GLOBAL_CROPS + (local_len,) * LOCAL_CROPS
        shapes = {"global": (GLOBAL_CROPS * images, global_len, None),
                  "local": (LOCAL_CROPS * images, local_len, None),
                  "packed": (images, sum(packed), packed)}
        for crops, (sequences, tokens, segment_lengths) in shapes.items():
            try:
                times = time_backend(backend, sequences, tokens, heads, segment_lengths, dtype,
                                     runs, warmup)
            except Exception as error:  # A backend may reject a shape: report it, go on.
                times = (f"error: {type(error).__name__}",) * 2
            rows.append(dict(backend=backend, heads=heads, images=images, registers=registers,
                             crops=crops, sequences=sequences, tokens=tokens, fwd=times[0],
                             fwd_bwd=times[1]))
    return rows


def cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_tables(rows):
    print("| backend | crops | heads | images | sequences x tokens | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['crops']} | {row['heads']} | {row['images']} | "
              f"{row['sequences']} x {row['tokens']} | {cell(row['fwd'])} | "
              f"{cell(row['fwd_bwd'])} |")

    print("\npacked vs separate global+local calls, fwd+bwd:")
    print("| backend | heads | images | packed tokens | global+local ms | packed ms | "
          "packed/separate |")
    print("|---|---|---|---|---|---|---|")
    fwd_bwd = {(r["backend"], r["heads"], r["images"], r["registers"], r["crops"]): r["fwd_bwd"]
               for r in rows}
    for row in rows:
        if row["crops"] != "packed":
            continue
        setting = (row["backend"], row["heads"], row["images"], row["registers"])
        times = (fwd_bwd[(*setting, "global")], fwd_bwd[(*setting, "local")], row["fwd_bwd"])
        if all(isinstance(t, float) for t in times):
            separate = times[0] + times[1]
            print(f"| {row['backend']} | {row['heads']} | {row['images']} | {row['tokens']} | "
                  f"{separate:.3f} | {times[2]:.3f} | {times[2] / separate:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends (default: this platform's)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per cell (>= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.runs < 20:
        parser.error(f"--runs must be >= 20; got {args.runs}")

    platform = jax.default_backend()
    backends = (args.backends.split(",") if args.backends else
                PLATFORM_BACKENDS.get(platform, ("xla",)))
    if args.quick:
        heads_list, images_list, registers_list = (2,), (1,), (0,)
    else:
        heads_list, images_list, registers_list = (6, 16, 24), (16, 64), (0, 4)
    device = jax.devices()[0]
    print(f"device: {platform} {device.device_kind} (jax {jax.__version__}), dtype {args.dtype}, "
          f"head dim {HEAD_DIM}, median of {args.runs} runs")
    rows = benchmark_rows(backends, heads_list, images_list, registers_list,
                          jnp.dtype(args.dtype), args.runs, args.warmup)
    print_tables(rows)


if __name__ == "__main__":
    main()
