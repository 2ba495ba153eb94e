"""dinov2_jax.profiling: StepProfiler traces exactly the steps it is given, and the summary
sums op time without counting an enclosing loop twice."""
import gzip
import json
import re
import time
import types

import jax
import jax.numpy as jnp
import pytest

from dinov2_jax import profiling
from dinov2_jax.errors import ConfigError


@pytest.mark.parametrize("spec, expected", [("", None), ("  ", None), ("10,15", (10, 15)),
                                            (" 2 , 2 ", (2, 2))])
def test_parse_steps(spec, expected):
    assert profiling.parse_steps(spec) == expected


@pytest.mark.parametrize("spec", ["10", "10-15", "a,b", "1,5", "9,3", "10,15,20"])
def test_parse_steps_rejects(spec):
    with pytest.raises(ConfigError, match="profile_steps"):
        profiling.parse_steps(spec)


def _step():
    """A jitted step with one while loop (4 iterations of tanh) per call."""
    @jax.jit
    def step(x):
        y = x @ x
        return jax.lax.fori_loop(0, 4, lambda i, z: jnp.tanh(z) + 1.0, y)
    return step


def _loop_count(summary):
    """Events of the op that runs the loop: a `while`, or on newer XLA CPU a `call` thunk that
    wraps a small loop (frontend attribute xla_cpu_small_call), whose body is not traced."""
    return sum(op["count"] for op in summary["ops"] if re.fullmatch(r"(while|call)(\.\d+)?",
                                                                    op["op"]))


def test_the_loop_is_one_entry_op():
    """The premise of _loop_count: the compiled step's entry computation runs the loop as one
    `while` or `call` op (whichever this XLA emits), the only one of either kind."""
    step = _step()
    text = step.lower(jnp.ones((8, 8))).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    loops = re.findall(r"\s(while|call)\(", entry)
    assert len(loops) == 1, entry


def test_traces_exactly_first_to_last(tmp_path):
    step = _step()
    x = jax.random.normal(jax.random.key(0), (96, 96))
    x = step(x)  # compile outside the trace
    profiler = profiling.StepProfiler("3,5", tmp_path / "trace")
    for number in range(1, 9):
        out = step(x)
        profiler.after_step(number, out)
        assert profiler.tracing == (2 <= number < 5)
    assert profiler.close() is profiler.summary
    summary = profiler.summary
    assert summary["steps"] == [3, 5]
    assert _loop_count(summary) == 3  # steps 3, 4 and 5, one loop each
    assert summary["per_step_ms"] == pytest.approx(summary["total_ms"] / 3)
    assert sum(op["percent"] for op in summary["ops"]) <= 100.0 + 1e-6
    # The files TensorBoard's profile plugin and Perfetto read, and the summary beside them.
    runs = list((tmp_path / "trace" / "plugins" / "profile").iterdir())
    assert len(runs) == 1 and list(runs[0].glob("*.xplane.pb"))
    with gzip.open(runs[0] / "perfetto_trace.json.gz") as file:
        assert json.load(file)  # valid JSON
    assert json.loads((tmp_path / "trace" / "top_ops.json").read_text())["steps"] == [3, 5]
    text = (tmp_path / "trace" / "top_ops.txt").read_text()
    assert "ms per step" in text and re.search(r"\b(while|call)\b", text)
    assert summary["trace"].startswith(str(tmp_path / "trace"))


def test_loop_time_is_not_counted_twice(tmp_path):
    """A while loop's event encloses its body's ops: the summary keeps only its own time, so
    the ops' total fits inside the wall time of the traced steps."""
    step = _step()
    x = step(jnp.ones((256, 256)))
    profiler = profiling.StepProfiler("2,3", tmp_path)
    profiler.after_step(1, x)
    start = time.perf_counter()
    for number in (2, 3):
        out = step(x)
        profiler.after_step(number, out)
    wall_ms = 1e3 * (time.perf_counter() - start)
    summary = profiler.summary
    assert summary is not None and summary["ops"]
    assert _loop_count(summary) == 2
    assert 0 < summary["total_ms"] <= wall_ms


def test_close_inside_the_range_and_resume_inside_it(tmp_path):
    step = _step()
    x = step(jnp.ones((32, 32)))
    profiler = profiling.StepProfiler("4,100", tmp_path / "a")
    for number in range(6, 9):  # resumed at step 6: steps 7 and 8 are traced
        out = step(x)
        profiler.after_step(number, out)
    summary = profiler.close(out)
    assert summary["steps"] == [7, None] and summary["per_step_ms"] is None
    assert _loop_count(summary) == 2
    assert profiler.close() is summary  # closing again changes nothing


def test_empty_spec_and_passed_range_trace_nothing(tmp_path):
    step = _step()
    x = step(jnp.ones((8, 8)))
    for spec, steps in (("", range(1, 5)), ("2,3", range(10, 12))):
        profiler = profiling.StepProfiler(spec, tmp_path / "none")
        for number in steps:
            profiler.after_step(number, step(x))
            assert not profiler.tracing
        assert profiler.close() is None
    assert not (tmp_path / "none").exists()


class _Event:
    def __init__(self, name, start_ns, end_ns, stats=(("hlo_op", "x"),)):
        self.name, self.start_ns, self.end_ns, self.stats = name, start_ns, end_ns, list(stats)


class _Line:
    def __init__(self, name, events):
        self.name, self.events = name, events


def test_self_time_of_nested_and_overlapping_events():
    """A loop event enclosing two ops keeps only its uncovered time; an event half-overlapping
    another (two streams on one line) takes away only the overlap; events without an hlo_op
    (profiler bookkeeping) are left out of host lines."""
    host = types.SimpleNamespace(lines=[_Line("worker", [
        _Event("while.1", 0, 100), _Event("fusion.a", 10, 30), _Event("fusion.b", 40, 90),
        _Event("ThreadpoolListener::Record", 50, 50, stats=()),
        _Event("copy.1", 200, 260), _Event("copy.2", 240, 300)])])
    times = {name: ns for name, ns, _ in profiling._op_events(host)}
    assert times == {"while.1": 30, "fusion.a": 20, "fusion.b": 50, "copy.1": 40, "copy.2": 60}
    device = types.SimpleNamespace(lines=[
        _Line("XLA Ops", [_Event("gemm", 0, 10, stats=())]),
        _Line("Stream #1", [_Event("kernel", 0, 10)])])
    assert [(n, t) for n, t, _ in profiling._op_events(device)] == [("gemm", 10)]
