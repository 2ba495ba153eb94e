"""Times the attention backends at DINOv2 shapes, forward and forward+backward.

Per image the student sees 2 global crops of 1+R+256 tokens and 8 local crops of 1+R+49
tokens (ViT-*/14, 224 and 98 px, R registers): run as two batched calls (global, local) or
packed into one sequence of 2x257+8x50 = 914 tokens (954 with 4 registers) whose crops are
segments. Heads are those of ViT-S (6), ViT-L (16) and ViT-g (24), head dim 64.

Prints the device, a markdown table of median times over >= 20 timed runs after warm-up (with
TFLOP/s: 4 x tokens^2 x heads x head dim FLOPs per segment forward, 3x that forward+backward,
so a packed call counts only its crops' blocks), and the packed-vs-separate comparison
(packed fwd+bwd against the sum of the global and local calls). `--json_out` rows add MFU
and the compiled program's memory.

  python benchmarks/attention.py                   # every backend of this platform
  python benchmarks/attention.py --heads=16,24 --images=32 --json_out=r.jsonl
  python benchmarks/attention.py --quick           # tiny sizes (CPU smoke run)
  python benchmarks/attention.py --quick --backends=xla,pallas --interpret   # Pallas on CPU
"""
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dinov2_jax import cli, flops
from dinov2_jax.models.attention import BACKENDS, dot_product_attention
import results

PLATFORM_BACKENDS = {"cpu": ("xla",), "gpu": ("xla", "cudnn", "pallas"),
                     "tpu": ("xla", "splash")}
HEAD_DIM = 64
GLOBAL_CROPS, LOCAL_CROPS = 2, 8


def define(flag_values):
    flags.DEFINE_bool("quick", False, "tiny sizes for a CPU smoke run", flag_values=flag_values)
    flags.DEFINE_list("backends", [], "backends to time (default: this platform's)",
                      flag_values=flag_values)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "input dtype",
                      flag_values=flag_values)
    flags.DEFINE_list("heads", ["6", "16", "24"], "head counts", flag_values=flag_values)
    flags.DEFINE_list("images", ["16", "64"], "images per call", flag_values=flag_values)
    flags.DEFINE_list("registers", ["0", "4"], "register tokens per crop",
                      flag_values=flag_values)
    flags.DEFINE_integer("runs", 20, "timed runs per cell (>= 20)", flag_values=flag_values)
    flags.DEFINE_integer("warmup", 3, "untimed runs first", flag_values=flag_values)
    flags.DEFINE_bool("interpret", False, "run the Pallas backends in the interpreter (CPU)",
                      flag_values=flag_values)
    flags.DEFINE_float("peak_flops", 0.0, "device peak FLOP/s for MFU (0: dinov2_jax.flops' "
                       "table)", flag_values=flag_values)
    flags.DEFINE_string("json_out", "", "append one JSON line per cell to this file",
                        flag_values=flag_values)


def crop_lengths(registers: int) -> tuple[int, int]:
    """Tokens of a global and a local crop: cls + registers + 16x16 or 7x7 patches."""
    return 1 + registers + 16 * 16, 1 + registers + 7 * 7


def attention_flops(sequences, segment_lengths, heads):
    """Forward FLOPs: q k^T and p v of every segment (2 x 2 x n^2 x heads x head_dim)."""
    return sequences * sum(4 * n * n * heads * HEAD_DIM for n in segment_lengths)


def median_ms(compiled, args, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def time_backend(backend, sequences, tokens, heads, segment_lengths, dtype, runs, warmup,
                 interpret):
    """{direction: (median ms, compiled peak bytes)} for "fwd" and "fwd_bwd"."""
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (sequences, tokens, heads, HEAD_DIM)
    q, k, v, cotangent = (jax.random.normal(key, shape, dtype) for key in keys)

    def attention(q, k, v):
        return dot_product_attention(q, k, v, segment_lengths=segment_lengths, backend=backend,
                                     interpret=interpret)

    def forward_backward(q, k, v, g):
        return jax.vjp(attention, q, k, v)[1](g)

    out = {}
    for direction, fn, args in (("fwd", attention, (q, k, v)),
                                ("fwd_bwd", forward_backward, (q, k, v, cotangent))):
        compiled = jax.jit(fn).lower(*args).compile()
        out[direction] = (median_ms(compiled, args, runs, warmup),
                          results.compiled_peak_bytes(compiled))
    return out


def benchmark_rows(backends, heads_list, images_list, registers_list, dtype, runs, warmup,
                   interpret=False, peak_flops=0.0):
    """One JSON row per (heads, images, registers, backend, crops, direction); crops are
    global, local or packed. A shape a backend rejects gives rows with an error."""
    rows = []
    peak = flops.peak_flops_per_device(override=peak_flops)
    facts = results.device_facts()
    for heads, images, registers, backend in itertools.product(
            heads_list, images_list, registers_list, backends):
        global_len, local_len = crop_lengths(registers)
        packed = (global_len,) * GLOBAL_CROPS + (local_len,) * LOCAL_CROPS
        shapes = {"global": (GLOBAL_CROPS * images, global_len, None),
                  "local": (LOCAL_CROPS * images, local_len, None),
                  "packed": (images, sum(packed), packed)}
        for crops, (sequences, tokens, segment_lengths) in shapes.items():
            cell = dict(benchmark="attention", impl="dinov2_jax", **facts, backend=backend,
                        config=f"{backend} {crops} h{heads}", heads=heads, batch=images,
                        registers=registers, crops=crops, sequences=sequences, tokens=tokens,
                        dtype=str(jnp.dtype(dtype)))
            try:
                timed = time_backend(backend, sequences, tokens, heads, segment_lengths, dtype,
                                     runs, warmup, interpret)
            except Exception as error:  # A backend may reject a shape: report it, go on.
                message = f"{type(error).__name__}: {error}"[:1000]
                rows += [dict(cell, direction=d, error=message) for d in ("fwd", "fwd_bwd")]
                continue
            forward_flops = attention_flops(sequences, segment_lengths or (tokens,), heads)
            for direction, (ms, memory) in timed.items():
                model_flops = forward_flops * (3 if direction == "fwd_bwd" else 1)
                rows.append(dict(cell, direction=direction, ms=ms,
                                 images_per_s=1e3 * images / ms, tflops=model_flops / ms / 1e9,
                                 mfu=model_flops / (ms / 1e3) / peak if peak else None,
                                 peak_mem_GiB=results.gib(memory), memory="compiled"))
    return rows


def print_tables(rows):
    """Markdown tables: one row per cell, then packed against separate global+local calls."""
    cells = {}
    for row in rows:
        cells.setdefault((row["backend"], row["heads"], row["batch"], row["registers"],
                          row["crops"]), {})[row["direction"]] = row

    def ms(row):
        return f"{row['ms']:.3f}" if "ms" in row else f"error: {row['error'].split(':')[0]}"

    print("| backend | crops | heads | images | registers | sequences x tokens | fwd ms | "
          "fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (backend, heads, images, registers, crops), cell in cells.items():
        fwd, fwd_bwd = cell["fwd"], cell["fwd_bwd"]
        tflops = f"{fwd_bwd['tflops']:.1f}" if "tflops" in fwd_bwd else "-"
        print(f"| {backend} | {crops} | {heads} | {images} | {registers} | {fwd['sequences']} x "
              f"{fwd['tokens']} | {ms(fwd)} | {ms(fwd_bwd)} | {tflops} |")

    print("\npacked vs separate global+local calls, fwd+bwd:")
    print("| backend | heads | images | registers | packed tokens | global+local ms | packed ms "
          "| packed/separate |")
    print("|---|---|---|---|---|---|---|---|")
    for (backend, heads, images, registers, crops), cell in cells.items():
        if crops != "packed":
            continue
        parts = [cells[(backend, heads, images, registers, c)]["fwd_bwd"]
                 for c in ("global", "local")] + [cell["fwd_bwd"]]
        if all("ms" in part for part in parts):
            separate = parts[0]["ms"] + parts[1]["ms"]
            print(f"| {backend} | {heads} | {images} | {registers} | {parts[2]['tokens']} | "
                  f"{separate:.3f} | {parts[2]['ms']:.3f} | {parts[2]['ms'] / separate:.2f} |")


def _ints(flag_values, name):
    try:
        values = [int(v) for v in flag_values[name].value]
    except ValueError:
        raise cli.ConfigError(f"--{name}: {flag_values[name].value} are not integers") from None
    if not values or min(values) < 0 or (name != "registers" and min(values) < 1):
        raise cli.ConfigError(f"--{name}: {values} out of range")
    return values


def main(argv):
    flag_values = cli.parse(argv, define, __doc__)
    if flag_values.runs < 20:
        raise cli.ConfigError(f"--runs must be >= 20; got {flag_values.runs}")
    platform = jax.default_backend()
    backends = flag_values.backends or list(PLATFORM_BACKENDS.get(platform, ("xla",)))
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise cli.ConfigError(f"--backends: unknown {unknown}; choose from {BACKENDS}")
    if flag_values.quick:
        heads_list, images_list, registers_list = [2], [1], [0]
    else:
        heads_list, images_list, registers_list = (_ints(flag_values, name) for name in
                                                   ("heads", "images", "registers"))
    device = jax.devices()[0]
    print(f"device: {platform} {device.device_kind} (jax {jax.__version__}), dtype "
          f"{flag_values.dtype}, head dim {HEAD_DIM}, median of {flag_values.runs} runs")
    rows = benchmark_rows(backends, heads_list, images_list, registers_list,
                          jnp.dtype(flag_values.dtype), flag_values.runs, flag_values.warmup,
                          flag_values.interpret, flag_values.peak_flops)
    results.append_rows(flag_values.json_out, rows)
    print_tables(rows)


if __name__ == "__main__":
    cli.run(main)
