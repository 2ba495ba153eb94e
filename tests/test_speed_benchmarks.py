"""benchmarks/train_step.py and benchmarks/features.py run on CPU, print sound tables and write
JSON rows that agree with them; train_step.py's --profile_steps leaves a trace and its top ops.

The runs share one persistent compilation cache per pytest session (the device suite's test
compiles the same smoke step), so a step compiled once is not compiled again.
"""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "jax_cache"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _run(env, *args, returncode=0):
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == returncode, result.stderr[-3000:]
    return result.stdout if returncode == 0 else result.stderr


def _table(output, first_column):
    """{column: [values]} of the table whose header starts with `first_column` (columns are
    separated by two or more spaces; no cell is empty or holds two spaces)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_column])
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    assert all(len(row) == len(rows[0]) for row in rows), rows
    return {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}


def test_train_step_benchmark_runs_the_smoke_recipe_on_cpu(env, tmp_path):
    rows_file, profile_dir = tmp_path / "rows.jsonl", tmp_path / "profile"
    output = _run(env, "benchmarks/train_step.py", "--config=configs/vitl14.py", "--batch=2",
                  "--steps=20", "--warmup=1", "--config.peak_flops=1e12",
                  f"--json_out={rows_file}", "--profile_steps=22,23",
                  f"--profile_dir={profile_dir}")
    assert "overrides: peak_flops=1000000000000.0" in output
    table = _table(output, "config")
    assert table["config"] == ["vitl14:smoke"]
    assert table["model"] == ["D48 L2 p14 swiglu float32"]
    assert table["batch/device"] == ["2"]
    median, fastest = float(table["median ms"][0]), float(table["min ms"][0])
    assert 0 < fastest <= median
    images_per_second = float(table["img/s"][0])
    # img/s = batch / median step time; the median is printed to 0.1 ms, so on a fast step
    # the check allows exactly that rounding (+-0.05 ms) and the 0.1 img/s of the printout.
    slowest_rate, fastest_rate = 2 / ((median + 0.05) / 1e3), 2 / (max(median - 0.05, 1e-3) / 1e3)
    assert slowest_rate - 0.1 <= images_per_second <= fastest_rate + 0.1
    # MFU from the printed numbers and the overridden peak of 1e12 FLOP/s.
    mfu = float(table["MFU"][0].rstrip("%")) / 100
    expected = float(table["GFLOP/img"][0]) * 1e9 * images_per_second / 1e12
    assert abs(mfu - expected) < 0.02 * expected + 1e-3
    assert table["peak GiB"] == ["n/a"]  # CPU devices report no memory stats

    (row,) = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert row["benchmark"] == "train_step" and row["impl"] == "dinov2_jax"
    assert (row["device"], row["platform"], row["config"], row["batch"]) == (
        "cpu", "cpu", "vitl14:smoke", 2)
    assert row["jax"] and row["steps"] == 20
    assert row["overrides"] == {"peak_flops": "1000000000000.0"}
    assert row["images_per_s"] == pytest.approx(2e3 / row["step_ms_median"])
    assert row["mfu"] == pytest.approx(row["flops_per_image"] * row["images_per_s"] / 1e12)
    assert f"{row['step_ms_median']:.1f}" == table["median ms"][0]
    assert row["peak_mem_GiB"] is None and row["step_mem_GiB"] > 0
    assert row["loss"] > 0 and row["compile_s"] > 0

    # Steps 22 and 23 (after the 21 timed and warm-up steps) were traced.
    assert row["profile"]["dir"] == str(profile_dir / "batch_2")
    assert row["profile"]["top_ops"] and row["profile"]["per_step_ms"] > 0
    summary = json.loads((profile_dir / "batch_2" / "top_ops.json").read_text())
    assert summary["steps"] == [22, 23] and summary["ops"][:10] == row["profile"]["top_ops"]
    assert list((profile_dir / "batch_2" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert "ms per step" in output  # the printed top ops


def test_train_step_benchmark_rejects_a_bad_profile_range(env):
    error = _run(env, "benchmarks/train_step.py", "--config=configs/vitl14.py",
                 "--profile_steps=1,3", "--profile_dir=/tmp/unused", returncode=1)
    assert "error: profile_steps: '1,3' needs 2 <= FIRST <= LAST" in error


def test_features_benchmark_quick(env, tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    output = _run(env, "benchmarks/features.py", "--quick", "--archs=vits14,vitb14",
                  "--peak_flops=1e12", f"--json_out={rows_file}")
    table = _table(output, "arch")
    assert table["arch"] == [f"{arch} (depth 1)" for arch in ("vits14", "vitb14")
                             for _ in range(2)]
    assert table["size"] == ["28", "56"] * 2
    assert all(float(v) > 0 for v in table["img/s"])
    assert "bfloat16" in output
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["arch"], r["size"], r["batch"]) for r in rows] == [
        (arch, size, 2) for arch in ("vits14", "vitb14") for size in (28, 56)]
    for row, printed in zip(rows, table["img/s"]):
        assert f"{row['images_per_s']:.1f}" == printed
        assert row["mfu"] == pytest.approx(row["flops_per_image"] * row["images_per_s"] / 1e12)
        assert row["peak_mem_GiB"] > 0 and row["dtype"] == "bfloat16"
    # A wider model at the same image costs more FLOPs per image.
    flops = {(r["arch"], r["size"]): r["flops_per_image"] for r in rows}
    assert flops[("vits14", 28)] < flops[("vitb14", 28)]
    assert flops[("vits14", 28)] < flops[("vits14", 56)]
