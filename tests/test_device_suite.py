"""benchmarks/device_suite.py: the prepared device run, proven on the CPU with --smoke.

One smoke run of every kind of stage (the environment probe, the reference's train step and
feature extraction through its harness, dinov2_jax's train step with a trace, features and
attention with the Pallas kernel in interpret mode) and one --tune run; the tests read their
rows, summary and trace. The reference stages need what benchmarks/gpu/prepare.sh puts into
.devref/; without it they must leave error rows that say so, and the rest still runs. The
table logic (ratios, targets, MFU of reference rows) and a stage's timeout are also checked
on synthetic rows and a sleeping script.
"""
import gzip
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DEVREF = REPO / ".devref"
HARNESS_READY = all((DEVREF / path).exists() for path in (
    "torch_ref/train_step.py", "dinov2_src/dinov2/train", "cpu_site/omegaconf"))
STAGES = ("env,reference_vitl14,jax_vitl14,reference_vitg14,reference_features,jax_features,"
          "jax_attention")
PEAK = 1e12  # a stand-in peak FLOP/s: CPUs have none in dinov2_jax.flops

spec = importlib.util.spec_from_file_location("device_suite", REPO / "benchmarks" /
                                              "device_suite.py")
device_suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_suite)


def _suite(tmp_path_factory, name, *args):
    out = tmp_path_factory.mktemp(name)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    result = subprocess.run(
        [sys.executable, "benchmarks/device_suite.py", str(out), "--smoke", "--budget_s=1500",
         f"--peak_flops={PEAK}", f"--scratch={out}_scratch", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows, result.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return _suite(tmp_path_factory, "smoke", f"--only={STAGES}")


@pytest.fixture(scope="module")
def tune(tmp_path_factory, smoke):  # after the smoke run: its compiled step is cached
    return _suite(tmp_path_factory, "tune", "--tune", "--variants=base,attention=xla",
                  "--only=tune_base,tune_attention=xla")


def _one(rows, **match):
    found = [row for row in rows if all(row.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


@pytest.mark.slow
def test_smoke_runs_every_kind_of_stage(smoke):
    out, rows, stdout = smoke
    assert sorted(p.name for p in out.iterdir()) == sorted(device_suite.RESULT_FILES)
    assert {row["stage"] for row in rows} == set(STAGES.split(","))
    env = _one(rows, benchmark="env")
    assert env["jax"] and env["platform"] == "cpu" and env["python"]
    ours = [row for row in rows if row["impl"] == "dinov2_jax"]
    assert ours and not [row for row in ours if "error" in row]
    step = _one(rows, benchmark="train_step", impl="dinov2_jax")
    assert (step["config"], step["batch"], step["device"]) == ("vitl14:smoke", 2, "cpu")
    assert step["mfu"] == pytest.approx(step["flops_per_image"] * step["images_per_s"] / PEAK)
    assert step["profile"]["top_ops"]
    features = [row for row in ours if row["benchmark"] == "features"]
    assert [(r["config"], r["size"], r["batch"]) for r in features] == [
        ("vits14 (depth 1)", 28, 2), ("vits14 (depth 1)", 56, 2)]
    attention = [row for row in ours if row["benchmark"] == "attention"]
    assert {(r["backend"], r["crops"], r["direction"]) for r in attention} == {
        (b, c, d) for b in ("xla", "pallas") for c in ("global", "local", "packed")
        for d in ("fwd", "fwd_bwd")}
    for row in attention:
        assert row["ms"] > 0 and row["mfu"] == pytest.approx(row["tflops"] * 1e12 / PEAK)
    for row in rows:
        assert row["jax"] == env["jax"]  # every row names the run's jax
    assert "## Reference vs dinov2_jax" in stdout  # the summary ends the output


@pytest.mark.slow
def test_reference_rows_and_their_mfu(smoke):
    _, rows, _ = smoke
    reference = [row for row in rows if row["impl"] == "reference"]
    assert {(r["benchmark"], r["config"].split(":")[0], r["batch"]) for r in reference} == {
        ("train_step", "vitl14", 2), ("train_step", "vitg14", 2), ("features", "vits14", 2)}
    if not HARNESS_READY:  # CI: no .devref; the stage says what is missing, the rest ran
        assert all("prepare.sh" in row["error"] for row in reference)
        return
    assert not [row for row in reference if "error" in row]
    ref = _one(rows, benchmark="train_step", impl="reference", config="vitl14:smoke")
    assert ref["images_per_s"] > 0 and ref["device"] == "cpu" and ref["torch"]
    assert set(ref["losses"]) == {"dino_local_crops_loss", "dino_global_crops_loss",
                                  "koleo_loss", "ibot_loss"}
    ours = _one(rows, benchmark="train_step", impl="dinov2_jax")
    # The reference's MFU uses dinov2_jax's FLOPs of the same config and batch.
    assert ref["mfu"] == pytest.approx(ref["images_per_s"] * ours["flops_per_image"] / PEAK)


@pytest.mark.slow
def test_summary_pairs_the_rows(smoke):
    out, rows, _ = smoke
    summary = (out / "summary.md").read_text()
    lines = {line.split("|")[1].strip() + " " + line.split("|")[2].strip() + " " +
             line.split("|")[4].strip(): line for line in summary.splitlines()
             if line.startswith("| train_step") or line.startswith("| features")}
    ours = _one(rows, benchmark="train_step", impl="dinov2_jax")
    line = lines["train_step vitl14 -"]
    assert f"| {ours['images_per_s']:.1f} |" in line
    if HARNESS_READY:
        ref = _one(rows, benchmark="train_step", impl="reference", config="vitl14:smoke")
        assert f"| {ours['images_per_s'] / ref['images_per_s']:.2f}x |" in line
        ref = _one(rows, benchmark="features", impl="reference")
        jax_row = _one(rows, benchmark="features", impl="dinov2_jax", size=28)
        met = "yes" if jax_row["images_per_s"] / ref["images_per_s"] >= 1.3 else "no"
        assert lines["features vits14 28"].rstrip().endswith(f"| {met} |")
    assert "| n/a |" in lines["features vits14 56"]  # no reference row at 56 px
    assert "| pallas ms | xla ms | fastest |" in summary
    top_ops = (out / "profile_top_ops.txt").read_text()
    assert top_ops.startswith("== batch_2\n/host:CPU:") and "ms per step" in top_ops
    with gzip.open(out / "trace.perfetto.json.gz") as file:
        assert json.load(file)
    log = (out / "suite.log").read_text()
    assert all(f"===== {stage}:" in log for stage in STAGES.split(","))


@pytest.mark.slow
def test_tune_reruns_the_step_per_variant(tune):
    out, rows, _ = tune
    variants = [row for row in rows if "variant" in row]
    assert [(r["variant"], r["config"], r["batch"]) for r in variants] == [
        ("base", "vitl14:smoke", 2), ("attention=xla", "vitl14:smoke", 2)]
    assert _one(rows, variant="attention=xla")["attention"] == "xla"
    assert all(row["images_per_s"] > 0 for row in variants)
    summary = (out / "summary.md").read_text()
    base_line = next(line for line in summary.splitlines() if line.startswith("| base |"))
    assert base_line.endswith("| 1.00x | - |")  # vs base; no reference stage in this run


def test_enrich_and_comparison_on_synthetic_rows():
    rows = [
        {"benchmark": "env", "jax": "9.9"},
        {"benchmark": "train_step", "impl": "dinov2_jax", "config": "vitl14", "batch": 32,
         "images_per_s": 300.0, "mfu": 0.6, "peak_mem_GiB": 20.0},
        {"benchmark": "train_step", "impl": "reference", "config": "vitl14", "batch": 32,
         "images_per_s": 120.0, "peak_mem_GiB": 40.0},
        {"benchmark": "train_step", "impl": "dinov2_jax", "config": "vitg14", "batch": 12,
         "images_per_s": 50.0, "mfu": 0.4, "peak_mem_GiB": 40.0},
        {"benchmark": "train_step", "impl": "reference", "config": "vitg14", "batch": 12,
         "images_per_s": 28.0, "peak_mem_GiB": 52.0},
        {"benchmark": "train_step", "impl": "dinov2_jax", "config": "vitg14", "batch": 24,
         "error": "RESOURCE_EXHAUSTED"},
        {"benchmark": "features", "impl": "dinov2_jax", "config": "vitl14", "batch": 64,
         "size": 518, "images_per_s": 500.0, "mfu": 0.5},
    ]
    rows = device_suite.enrich(rows)
    assert rows[2]["mfu"] == pytest.approx(120.0 * 0.6 / 300.0) and rows[2]["jax"] == "9.9"
    assert rows[4]["mfu"] == pytest.approx(28.0 * 0.4 / 50.0)
    table = {tuple(cell.strip() for cell in line.split("|")[1:5]): line
             for line in device_suite.comparison_table(rows).splitlines()[2:]}
    # ViT-L/14: 2.5x and MFU 60% meet ">= 2x, MFU >= 50%".
    assert "| 2.50x |" in table[("train_step", "vitl14", "32", "-")]
    assert table[("train_step", "vitl14", "32", "-")].rstrip().endswith("| yes |")
    # ViT-g/14 bs12: 1.79x misses 2x although memory is 0.77x (also over 0.6x).
    line = table[("train_step", "vitg14", "12", "-")]
    assert "| 1.79x |" in line and "| 0.77x |" in line and line.rstrip().endswith("| no |")
    # ViT-g/14 bs24 did not fit: no.
    assert "| no (dinov2_jax error) |" in table[("train_step", "vitg14", "24", "-")]
    # Features without a reference row: the ratio is unknown.
    assert table[("features", "vitl14", "64", "518")].rstrip().endswith("| n/a |")


def test_a_stage_past_its_timeout_is_killed_and_reported(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text("import sys, time\nprint('started', flush=True)\ntime.sleep(60)\n")
    stage = device_suite.Stage("sleeper", "dinov2_jax", str(script), (),
                               (("train_step", "vitl14", 32, None),), 60)
    with open(tmp_path / "log", "w") as log:
        rows = device_suite.run_stage(stage, 3, tmp_path, tmp_path, log)
    (row,) = rows
    assert row["error"].startswith("timed out after 3 s: started")
    assert (row["benchmark"], row["config"], row["batch"], row["stage"]) == (
        "train_step", "vitl14", 32, "sleeper")
    assert row["stage_s"] < 30
    assert "----- sleeper: timed out after 3 s" in (tmp_path / "log").read_text()


def test_no_stage_starts_without_the_time_it_needs(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/device_suite.py", str(tmp_path / "out"), "--smoke",
         "--budget_s=5", "--only=reference_vitl14", f"--scratch={tmp_path / 'scratch'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in
              (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert row["error"].startswith("skipped: ") and row["config"] == "vitl14"
    assert "## Errors" in (tmp_path / "out" / "summary.md").read_text()
