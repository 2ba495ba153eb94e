"""Shared pytest setup: CPU-only JAX, deterministic-enough defaults, optional torch references,
and the one trained demo run that the slow warm-start tests share."""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XFORMERS_DISABLED", "1")
# One persistent compilation cache for the session, shared by the tests and every subprocess
# they start (they inherit the environment): the many short runs of the same demo configs then
# compile each step once (a demo:tiny run: ~35 s cold, ~12 s warm on 2 cores). A cached
# executable is the one XLA compiled, so results stay bitwise the same.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="dinov2_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores; CI leaves it "
                            "out, `pytest -m slow` runs it (README, Tests)")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TrainedDemo:
    """One run of the README's demo command, shared by the slow tests that start from a
    trained demo (warm starts, high-res adaptation, distillation): `workdir`, the run's
    `stdout`, its wall time `seconds` and its `metrics` (the parsed metrics.jsonl lines)."""

    def __init__(self, workdir, stdout, seconds):
        self.workdir, self.stdout, self.seconds = str(workdir), stdout, seconds
        with open(os.path.join(self.workdir, "metrics.jsonl")) as file:
            self.metrics = [json.loads(line) for line in file]


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """`python -m dinov2_jax.main --config=configs/demo.py` once per session (5-9 minutes on 2
    CPU cores), in a subprocess exactly as the README runs it."""
    workdir = tmp_path_factory.mktemp("trained_demo") / "demo"
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "dinov2_jax.main", "--config=configs/demo.py",
         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=2400,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    _TRAINED_DEMO_SECONDS.append(time.time() - start)
    return TrainedDemo(workdir, result.stdout, _TRAINED_DEMO_SECONDS[-1])


_TRAINED_DEMO_SECONDS = []


def pytest_terminal_summary(terminalreporter):
    """The README demo's measured wall time, when this session ran it."""
    for seconds in _TRAINED_DEMO_SECONDS:
        terminalreporter.write_line(
            f"README demo (configs/demo.py, 1,500 steps): {seconds / 60:.1f} minutes")
