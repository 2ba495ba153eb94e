"""benchmarks/train_step.py and benchmarks/features.py run on CPU and print sound tables."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _table(output, first_column):
    """{column: [values]} of the table whose header starts with `first_column` (columns are
    separated by two or more spaces; no cell is empty or holds two spaces)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_column])
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[start:] if line.strip()]
    assert all(len(row) == len(rows[0]) for row in rows), rows
    return {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}


def test_train_step_benchmark_runs_the_smoke_recipe_on_cpu():
    output = _run("benchmarks/train_step.py", "--config=configs/vitl14.py", "--batch=2",
                  "--steps=20", "--warmup=1", "--config.peak_flops=1e12",
                  "--config.student.remat_policy=dots")
    assert "overrides: peak_flops=1000000000000.0, student.remat_policy=dots" in output
    table = _table(output, "config")
    assert table["config"] == ["vitl14.py:smoke"]
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


def test_features_benchmark_quick():
    output = _run("benchmarks/features.py", "--quick")
    table = _table(output, "arch")
    assert table["arch"] == [f"{arch} (depth 1)" for arch in
                             ("vits14", "vitb14", "vitl14", "vitg14") for _ in range(2)]
    assert table["size"] == ["28", "56"] * 4
    assert all(float(v) > 0 for v in table["img/s"])
    assert "bfloat16" in output
