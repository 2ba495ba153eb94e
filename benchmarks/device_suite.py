"""One prepared device run: the reference and dinov2_jax side by side, written as JSON lines.

  python benchmarks/device_suite.py RESULTS_DIR            # the measurement, <= 8 min on an H200
  python benchmarks/device_suite.py RESULTS_DIR --tune     # the ViT-L/14 step's choices, shorter
  python benchmarks/device_suite.py RESULTS_DIR --smoke    # every stage on tiny shapes (CPU)

Each stage is one process with its own timeout, run in order of importance until the time
budget (--budget_s: 470 s, 300 s with --tune) is spent: the reference's train step (`benchmarks/gpu/reference.py`
over its timing harness) and dinov2_jax's (`benchmarks/train_step.py`) for ViT-L/14 at batch
32 and 64 (one trace of the dinov2_jax step, summarised by top ops) and ViT-g/14 at 12 and 24,
feature extraction at 224 px / batch 256 and 518 px / batch 64 (`benchmarks/features.py`),
the attention backends at ViT-L and ViT-g shapes, forward and forward+backward, the own
Pallas kernel included (`benchmarks/attention.py`), then ViT-S/B if time is left. A stage
that fails or runs out of time leaves error rows naming what it did not measure, and the
suite goes on. `--tune` reruns the ViT-L/14 step over the configuration choices (attention
backend, pack_crops, remat policy, dtype) against the same run's reference.

RESULTS_DIR receives (at most 5 files, so it can be a device run's $OUT): `results.jsonl`
(every row: device, jax or torch version, config, batch, img/s, MFU, peak memory; reference
rows get their MFU from dinov2_jax's FLOP count of the same config), `summary.md` (the
side-by-side tables with ratios and the targets), `suite.log` (every stage's output),
`profile_top_ops.txt` and `trace.perfetto.json.gz` (the ViT-L/14 step's trace). The suite
itself imports no JAX or torch: the device's memory belongs to one stage at a time.
"""
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags

from dinov2_jax import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
TRAIN_STEP, FEATURES, ATTENTION = ("benchmarks/train_step.py", "benchmarks/features.py",
                                   "benchmarks/attention.py")
REFERENCE = "benchmarks/gpu/reference.py"
RESULT_FILES = ("results.jsonl", "summary.md", "suite.log", "profile_top_ops.txt",
                "trace.perfetto.json.gz")
TRACE_LIMIT_BYTES = 16 * 2**20  # what a device run brings back per file
FULL_BUDGET_S, TUNE_BUDGET_S = 470, 300  # the full run fits 8 minutes with its start-up
# The goals (issue 20) by (benchmark, config, batch); ("features", None, None) is every row.
# (min ratio of img/s, min MFU, max ratio of peak memory); ViT-g/14 batch 24 only has to fit.
TARGETS = {
    ("train_step", "vitl14", 32): (2.0, 0.5, None),
    ("train_step", "vitl14", 64): (2.0, 0.5, None),
    ("train_step", "vitg14", 12): (2.0, None, 0.6),
    ("train_step", "vitg14", 24): (None, None, None),
    ("train_step", "vits14", 64): (2.0, None, None),
    ("train_step", "vitb14", 64): (2.0, None, None),
    ("features", None, None): (1.3, None, None),
}
# `--tune` variants of the ViT-L/14 step: name -> --config overrides, most telling first.
TUNE_VARIANTS = {
    "base": (),
    "attention=xla": ("student.attention=xla",),
    "attention=pallas": ("student.attention=pallas",),
    "pack_crops": ("student.pack_crops=True",),
    "pack_crops+pallas": ("student.pack_crops=True", "student.attention=pallas"),
    "remat=dots": ("student.remat_policy=dots",),
    "remat=dots_no_batch": ("student.remat_policy=dots_no_batch",),
    "remat=full": ("student.remat_policy=full",),
    "dtype=float32": ("student.dtype=float32",),
    "attention=cudnn": ("student.attention=cudnn",),
}
ENV_CODE = """
import json, platform, shutil, subprocess
out = {"benchmark": "env", "python": platform.python_version()}
try:
    import jax, jaxlib
    out.update(jax=jax.__version__, jaxlib=jaxlib.__version__, platform=jax.default_backend(),
               device=jax.devices()[0].device_kind, devices=jax.device_count())
except Exception as error:
    out["jax_error"] = repr(error)[:500]
for name in ("torch", "flax", "optax", "orbax.checkpoint", "grain", "numpy"):
    try:
        module = __import__(name, fromlist=["_"])
        out[name] = getattr(module, "__version__", "?")
    except Exception as error:
        out[name] = "missing: " + repr(error)[:200]
if shutil.which("nvidia-smi"):
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit"
    out["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=" + query, "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30).stdout.strip()
print(json.dumps(out))
"""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One process: `script args` (None: the environment probe), expected to write one row
    per `expects` entry (benchmark, config, batch, size)."""
    name: str
    impl: str
    script: str | None
    args: tuple
    expects: tuple
    timeout_s: int
    min_s: int = 45  # not started with less time left than this


def _train(impl, name, config, batches, timeout_s, smoke, extra=()):
    if impl == "reference":
        names = ",".join(f"{config}@{b}" for b in batches)
        args = (f"--train={names}",) + (("--smoke",) if smoke else ())
        script = REFERENCE
    else:
        steps = ("--steps=3", "--warmup=1") if smoke else ("--steps=20", "--warmup=3")
        args = (f"--config=configs/{config}.py", "--batch=" + ",".join(map(str, batches)),
                *steps, *extra)
        script = TRAIN_STEP
    expects = tuple(("train_step", config, b, None) for b in batches)
    return Stage(name, impl, script, args, expects, timeout_s)


def full_stages(smoke, scratch):
    """The measurement, most important first; smoke: the same stages on tiny shapes."""
    l_batches, g_batches, small_batches = ((2,), (2,), (2,)) if smoke else ((32, 64), (12, 24),
                                                                            (64,))
    timed = 23 if not smoke else 4  # warm-up + timed steps of train_step.py
    profile = (f"--profile_steps={timed + 1},{timed + 2}", f"--profile_dir={scratch}/profile")
    feature_archs = ("vits14",) if smoke else ("vitl14", "vitg14")
    sizes = ((28, 2),) if smoke else ((224, 256), (518, 64))
    reference_features = ",".join(f"{a}:{s}:{b}" for a in feature_archs for s, b in sizes)
    jax_feature_args = (("--quick",) if smoke else ("--sizes=224:256,518:64",)) + (
        "--archs=" + ",".join(feature_archs),)
    jax_sizes = ((28, 2), (56, 2)) if smoke else sizes  # features.py --quick: 28 and 56 px
    feature_expects = tuple(("features", a, b, s) for a in feature_archs for s, b in jax_sizes)
    attention_args = (("--quick", "--backends=xla,pallas", "--interpret") if smoke else
                      ("--heads=16,24", "--images=32", "--registers=0"))
    small_features = ",".join(f"{a}:{s}:{b}" for a in ("vits14", "vitb14")
                              for s, b in ((224, 256), (518, 64)))
    stages = [
        Stage("env", "env", None, (), (("env", None, None, None),), 60, 10),
        _train("reference", "reference_vitl14", "vitl14", l_batches, 120, smoke),
        _train("dinov2_jax", "jax_vitl14", "vitl14", l_batches, 180, smoke, profile),
        _train("reference", "reference_vitg14", "vitg14", g_batches, 150, smoke),
        _train("dinov2_jax", "jax_vitg14", "vitg14", g_batches, 180, smoke),
        Stage("reference_features", "reference", REFERENCE,
              (f"--features={reference_features}",) + (("--smoke",) if smoke else ()),
              tuple(("features", a, b, s) for a in feature_archs for s, b in sizes), 90),
        Stage("jax_features", "dinov2_jax", FEATURES, jax_feature_args, feature_expects, 120),
        Stage("jax_attention", "dinov2_jax", ATTENTION, attention_args, (), 100),
        _train("reference", "reference_vits14", "vits14", small_batches, 60, smoke),
        _train("dinov2_jax", "jax_vits14", "vits14", small_batches, 90, smoke),
        _train("reference", "reference_vitb14", "vitb14", small_batches, 60, smoke),
        _train("dinov2_jax", "jax_vitb14", "vitb14", small_batches, 90, smoke),
    ]
    if not smoke:  # S/B features last: the reference's harness times them in one process
        stages.append(Stage("reference_features_small", "reference", REFERENCE,
                            (f"--features={small_features}",),
                            tuple(("features", a, b, s) for a in ("vits14", "vitb14")
                                  for s, b in ((224, 256), (518, 64))), 60))
        stages.append(Stage("jax_features_small", "dinov2_jax", FEATURES,
                            ("--sizes=224:256,518:64", "--archs=vits14,vitb14"),
                            tuple(("features", a, b, s) for a in ("vits14", "vitb14")
                                  for s, b in ((224, 256), (518, 64))), 90))
    return stages


def tune_stages(smoke, batch, variants):
    """The reference's ViT-L/14 step at `batch`, then dinov2_jax's under each variant."""
    batch = 2 if smoke else batch
    stages = [Stage("env", "env", None, (), (("env", None, None, None),), 60, 10),
              _train("reference", "reference_vitl14", "vitl14", (batch,), 90, smoke)]
    for variant in variants:
        overrides = tuple(f"--config.{o}" for o in TUNE_VARIANTS[variant])
        stages.append(_train("dinov2_jax", f"tune_{variant}", "vitl14", (batch,), 120, smoke,
                             overrides))
    return stages


def _key(row):
    """(benchmark, config, batch, size) of a row; smoke configs ("vitl14:smoke", "vits14
    (depth 1)") match their full names."""
    config = row.get("config")
    config = config.split(":")[0].split(" ")[0] if isinstance(config, str) else config
    return row.get("benchmark"), config, row.get("batch"), row.get("size")


def _stage_env(stage, scratch, devref):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([str(devref / "cpu_site")] if stage.impl == "reference" and
                       (devref / "cpu_site").is_dir() else [])
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    if stage.impl == "reference":
        env.pop("XFORMERS_DISABLED", None)  # the harness's training path needs its shim
    if stage.impl == "dinov2_jax":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(scratch / "jax_cache"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if stage.impl == "env":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def run_stage(stage, timeout_s, scratch, devref, log, peak_flops=0.0):
    """The rows of one stage: those its process wrote, plus an error row for each expected
    row it did not write (the process's exit, timeout or last lines as the error).
    `peak_flops` (> 0) overrides the device's peak for dinov2_jax's MFU."""
    rows_file = scratch / f"{stage.name}.jsonl"
    rows_file.unlink(missing_ok=True)
    if stage.script is None:
        command = [sys.executable, "-c", ENV_CODE]
    else:
        command = [sys.executable, str(REPO / stage.script), *stage.args,
                   f"--json_out={rows_file}"]
        if stage.impl == "reference":
            command += [f"--harness={devref / 'torch_ref'}",
                        f"--dinov2_src={devref / 'dinov2_src'}"]
        elif peak_flops:
            command.append(("--config.peak_flops=" if stage.script == TRAIN_STEP
                            else "--peak_flops=") + str(peak_flops))
    start = time.monotonic()
    log.write(f"\n===== {stage.name}: {' '.join(command[1:]) if stage.script else 'env'} "
              f"(timeout {timeout_s} s)\n")
    log.flush()
    process = subprocess.Popen(command, cwd=REPO, env=_stage_env(stage, scratch, devref),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        failure = None if process.returncode == 0 else f"exit status {process.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the stage's own process group
        output, _ = process.communicate()
        failure = f"timed out after {timeout_s} s"
    seconds = time.monotonic() - start
    log.write(output)
    log.write(f"----- {stage.name}: {failure or 'ok'} in {seconds:.1f} s\n")
    log.flush()
    if stage.script is None:
        lines = [line for line in output.splitlines() if line.startswith("{")]
        rows = [json.loads(lines[-1])] if lines else []
    else:
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()
                if line.strip()] if rows_file.exists() else []
    tail = " | ".join(output.strip().splitlines()[-3:])[-600:]
    written = {_key(row) for row in rows}
    for benchmark, config, batch, size in stage.expects:
        if (benchmark, config, batch, size) not in written:
            rows.append({"benchmark": benchmark, "impl": stage.impl, "config": config,
                         "batch": batch, "size": size,
                         "error": f"{failure or 'no row written'}: {tail}"})
    if failure and not stage.expects and not any("error" in row for row in rows):
        rows.append({"benchmark": stage.name, "impl": stage.impl,
                     "error": f"{failure}: {tail}"})
    for row in rows:
        row.setdefault("impl", stage.impl)
        row.update(stage=stage.name, stage_s=round(seconds, 1))
    return rows


def enrich(rows):
    """Reference rows get MFU from dinov2_jax's FLOPs of the same (config, batch, size) and
    every row the run's jax version."""
    env = next((row for row in rows if row.get("benchmark") == "env"), {})
    mfu_per_image_s = {_key(row): row["mfu"] / row["images_per_s"] for row in rows
                       if row.get("impl") == "dinov2_jax" and row.get("mfu") and
                       row.get("images_per_s") and row.get("variant", "base") == "base"}
    for row in rows:
        row.setdefault("jax", env.get("jax"))
        if row.get("impl") == "reference" and row.get("images_per_s"):
            scale = mfu_per_image_s.get(_key(row))
            row["mfu"] = row["images_per_s"] * scale if scale else None
    return rows


def _fmt(value, spec=".1f", suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _target(key):
    return TARGETS.get(key[:3]) or TARGETS.get((key[0], None, None))


def _target_check(key, target, ours, ratio, memory_ratio):
    """(the target in words, "yes" / "no" / "n/a"): n/a where a number it needs is missing."""
    min_ratio, min_mfu, max_memory = target
    checks = []
    if key[:3] == ("train_step", "vitg14", 24):
        checks.append(bool(ours.get("images_per_s")))  # it only has to fit
    if min_ratio:
        checks.append(None if ratio is None else ratio >= min_ratio)
    if min_mfu:
        checks.append(None if ours.get("mfu") is None else ours["mfu"] >= min_mfu)
    if max_memory:
        checks.append(None if memory_ratio is None else memory_ratio <= max_memory)
    words = ", ".join(filter(None, (
        min_ratio and f">= {min_ratio}x", min_mfu and f"MFU >= {100 * min_mfu:.0f}%",
        max_memory and f"memory <= {max_memory}x"))) or "fits"
    if "error" in ours or False in checks:
        return words, "no"
    return words, "n/a" if None in checks else "yes"


def comparison_table(rows):
    """Markdown: reference and dinov2_jax side by side per (benchmark, config, batch, size)."""
    pairs = {}
    for row in rows:
        if row.get("benchmark") in ("train_step", "features") and "variant" not in row:
            pairs.setdefault(_key(row), {})[row["impl"]] = row
    lines = ["| benchmark | config | batch | px | reference img/s | dinov2_jax img/s | ratio | "
             "MFU ref / jax | peak GiB ref / jax (step) | memory ratio | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, by_impl in pairs.items():
        ref, ours = by_impl.get("reference", {}), by_impl.get("dinov2_jax", {})
        ratio = (ours["images_per_s"] / ref["images_per_s"]
                 if ours.get("images_per_s") and ref.get("images_per_s") else None)
        memory_ratio = (ours["peak_mem_GiB"] / ref["peak_mem_GiB"]
                        if ours.get("peak_mem_GiB") and ref.get("peak_mem_GiB") else None)
        target, met = _target(key), "-"
        if target:
            target, met = _target_check(key, target, ours, ratio, memory_ratio)
        error = "; ".join(f"{impl} error" for impl, row in by_impl.items() if "error" in row)
        mfu = f"{_fmt(ref.get('mfu'), '.1%')} / {_fmt(ours.get('mfu'), '.1%')}"
        memory = (f"{_fmt(ref.get('peak_mem_GiB'), '.1f')} / "
                  f"{_fmt(ours.get('peak_mem_GiB'), '.1f')} "
                  f"({_fmt(ours.get('step_mem_GiB'), '.1f')})")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {_fmt(key[3], 'd')} | "
                     f"{_fmt(ref.get('images_per_s'))} | {_fmt(ours.get('images_per_s'))} | "
                     f"{_fmt(ratio, '.2f', 'x')} | {mfu} | {memory} | "
                     f"{_fmt(memory_ratio, '.2f', 'x')} | {target or '-'} | "
                     f"{met}{' (' + error + ')' if error else ''} |")
    return "\n".join(lines)


def attention_table(rows):
    """Markdown: milliseconds per backend for each (heads, crops, direction), fastest marked."""
    cells = {}
    for row in rows:
        if row.get("benchmark") == "attention" and "direction" in row:
            cells.setdefault((row["heads"], row["batch"], row["crops"], row["direction"]), {})[
                row["backend"]] = row.get("ms")
    backends = sorted({b for cell in cells.values() for b in cell})
    lines = ["| heads | images | crops | direction | " + " | ".join(f"{b} ms" for b in backends)
             + " | fastest |", "|---|---|---|---|" + "---|" * (len(backends) + 1)]
    for (heads, images, crops, direction), cell in cells.items():
        timed = {b: ms for b, ms in cell.items() if ms is not None}
        fastest = min(timed, key=timed.get) if timed else "-"
        lines.append(f"| {heads} | {images} | {crops} | {direction} | " + " | ".join(
            _fmt(cell.get(b), ".3f") if cell.get(b) is not None else "error"
            for b in backends) + f" | {fastest} |")
    return "\n".join(lines)


def tune_table(rows):
    """Markdown: one line per `--tune` variant, against the base variant and the reference."""
    variants = [row for row in rows if "variant" in row]
    reference = next((row for row in rows if row.get("impl") == "reference" and
                      row.get("images_per_s")), {})
    base = next((row for row in variants if row["variant"] == "base" and
                 row.get("images_per_s")), {})
    lines = ["| variant | img/s | MFU | peak GiB | step GiB | compile s | vs base | vs reference |",
             "|---|---|---|---|---|---|---|---|"]
    for row in variants:
        rate = row.get("images_per_s")
        lines.append(
            f"| {row['variant']} | {_fmt(rate)} | {_fmt(row.get('mfu'), '.1%')} | "
            f"{_fmt(row.get('peak_mem_GiB'), '.2f')} | {_fmt(row.get('step_mem_GiB'), '.2f')} | "
            f"{_fmt(row.get('compile_s'))} | "
            f"{_fmt(rate / base['images_per_s'] if rate and base else None, '.2f', 'x')} | "
            f"{_fmt(rate / reference['images_per_s'] if rate and reference else None, '.2f', 'x')}"
            f" |" + (f" error: {row['error'][:120]}" if "error" in row else ""))
    return "\n".join(lines)


def summary_markdown(rows, mode, seconds):
    env = next((row for row in rows if row.get("benchmark") == "env"), {})
    head = (f"# dinov2_jax device suite ({mode}), {time.strftime('%Y-%m-%d')}\n\n"
            f"device: {env.get('device', '?')} ({env.get('nvidia_smi') or env.get('platform')})"
            f"; jax {env.get('jax')}, torch {env.get('torch')}, python {env.get('python')}; "
            f"{seconds:.0f} s\n")
    parts = [head]
    if mode == "tune":
        parts.append("## ViT-L/14 step variants\n\n" + tune_table(rows))
    else:
        parts.append("## Reference vs dinov2_jax\n\n" + comparison_table(rows))
        parts.append("## Attention backends\n\n" + attention_table(rows))
    errors = [row for row in rows if "error" in row]
    if errors:
        parts.append("## Errors\n\n" + "\n".join(
            f"- {row.get('stage')}: {row.get('config')} {row.get('batch') or ''}: "
            f"{row['error'][:300]}" for row in errors))
    return "\n\n".join(parts) + "\n"


def collect_profile(scratch, results_dir):
    """The traced steps' top ops (every batch) and the first Perfetto trace, if small."""
    summaries = sorted((scratch / "profile").glob("batch_*/top_ops.txt"))
    if summaries:
        (results_dir / "profile_top_ops.txt").write_text("".join(
            f"== {path.parent.name}\n{path.read_text()}\n" for path in summaries))
    traces = sorted((scratch / "profile").glob("batch_*/plugins/profile/*/perfetto_trace.json.gz"))
    if traces and traces[0].stat().st_size <= TRACE_LIMIT_BYTES:
        shutil.copy(traces[0], results_dir / "trace.perfetto.json.gz")


def define(flag_values):
    flags.DEFINE_bool("smoke", False, "every stage on tiny shapes (a CPU check of the suite)",
                      flag_values=flag_values)
    flags.DEFINE_bool("tune", False, "rerun the ViT-L/14 step over --variants instead",
                      flag_values=flag_values)
    flags.DEFINE_list("variants", list(TUNE_VARIANTS), "--tune variants, in order",
                      flag_values=flag_values)
    flags.DEFINE_integer("tune_batch", 64, "--tune: images per device", flag_values=flag_values)
    flags.DEFINE_list("only", [], "run only these stages (see --list)", flag_values=flag_values)
    flags.DEFINE_bool("list", False, "print the stages and exit", flag_values=flag_values)
    flags.DEFINE_integer("budget_s", 0, "seconds for all stages, a stage cut to what is left "
                         f"(0: {FULL_BUDGET_S} s, --tune {TUNE_BUDGET_S} s)",
                         flag_values=flag_values)
    flags.DEFINE_string("devref", str(REPO / ".devref"), "what benchmarks/gpu/prepare.sh "
                        "made: the reference harness, the official dinov2 source",
                        flag_values=flag_values)
    flags.DEFINE_float("peak_flops", 0.0, "device peak FLOP/s for MFU (0: dinov2_jax.flops' "
                       "table; CPUs have none)", flag_values=flag_values)
    flags.DEFINE_string("scratch", "", "folder for traces, per-stage rows and the compilation "
                        "cache (default: a new temporary folder)", flag_values=flag_values)


def main(argv):
    argv = list(sys.argv if argv is None else argv)
    positional = argv[1:2] if len(argv) > 1 and not argv[1].startswith("-") else []
    flag_values = cli.parse(argv[:1] + argv[1 + len(positional):], define, __doc__)
    mode = "tune" if flag_values.tune else "full"
    scratch = pathlib.Path(flag_values.scratch or (
        "SCRATCH" if flag_values.list else tempfile.mkdtemp(prefix="device_suite_")))
    unknown = sorted(set(flag_values.variants) - set(TUNE_VARIANTS))
    if unknown:
        raise cli.ConfigError(f"--variants: unknown {unknown}; choose from {list(TUNE_VARIANTS)}")
    stages = (tune_stages(flag_values.smoke, flag_values.tune_batch,
                          flag_values.variants) if flag_values.tune
              else full_stages(flag_values.smoke, scratch))
    if flag_values.only:
        unknown = sorted(set(flag_values.only) - {stage.name for stage in stages})
        if unknown:
            raise cli.ConfigError(f"--only: unknown stages {unknown} (see --list)")
        stages = [stage for stage in stages if stage.name in flag_values.only]
    if flag_values.list:
        for stage in stages:
            print(f"{stage.name:28} {stage.timeout_s:4d} s  {stage.script or 'env'} "
                  f"{' '.join(stage.args)}")
        return
    if not positional:
        raise cli.ConfigError("usage: device_suite.py RESULTS_DIR [--smoke] [--tune] ...")
    results_dir = pathlib.Path(positional[0])
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        (results_dir / name).unlink(missing_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    devref = pathlib.Path(flag_values.devref)
    start = time.monotonic()
    deadline = start + (flag_values.budget_s or
                        (TUNE_BUDGET_S if flag_values.tune else FULL_BUDGET_S))
    rows = []
    with open(results_dir / "suite.log", "w") as log, open(results_dir / "results.jsonl",
                                                            "w") as out:
        for stage in stages:
            left = int(deadline - time.monotonic())
            if left < stage.min_s:
                stage_rows = [{"benchmark": b, "impl": stage.impl, "config": c, "batch": n,
                               "size": s, "stage": stage.name,
                               "error": f"skipped: {left} s of the budget left"}
                              for b, c, n, s in stage.expects or ((stage.name, None, None,
                                                                   None),)]
            else:
                stage_rows = run_stage(stage, min(stage.timeout_s, left), scratch, devref, log,
                                       flag_values.peak_flops)
            if stage.name.startswith("tune_"):
                for row in stage_rows:
                    row["variant"] = stage.name.removeprefix("tune_")
            status = "; ".join(sorted({r["error"][:80] for r in stage_rows if "error" in r}))
            print(f"{stage.name}: {len(stage_rows)} rows, "
                  f"{status or 'ok'} ({time.monotonic() - start:.0f} s)", flush=True)
            for row in stage_rows:
                out.write(json.dumps(row) + "\n")
            out.flush()
            rows += stage_rows
    rows = enrich(rows)
    (results_dir / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    collect_profile(scratch, results_dir)
    summary = summary_markdown(rows, mode, time.monotonic() - start)
    (results_dir / "summary.md").write_text(summary)
    print(summary)
    if not flag_values.scratch:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    cli.run(main)
