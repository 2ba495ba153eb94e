"""A `jax.profiler` trace of a range of steps, and the top ops by time read back from it.

`StepProfiler("10,15", directory)` traces steps 10 to 15 of a run: the loop calls
`after_step(step, outputs)` after every step with the number of steps done (1 after the first
step), and `close()` at the end. The trace lands in `directory` in TensorBoard's layout
(`plugins/profile/RUN/HOST.xplane.pb`, for the profile plugin or XProf) with a Perfetto
`perfetto_trace.json.gz` beside it (ui.perfetto.dev), and `top_ops.txt`/`top_ops.json` sum
the XLA ops' device time over the traced steps. `directory` may be remote (gs://): the trace
is written locally first, then copied.
"""
import json
import pathlib
import re
import shutil
import tempfile

import jax
from etils import epath

from dinov2_jax.errors import ConfigError

TOP_OPS = 25


def parse_steps(spec: str):
    """"FIRST,LAST" -> (FIRST, LAST), or None for ""; ConfigError for anything else."""
    if not spec.strip():
        return None
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", spec)
    if not match:
        raise ConfigError(f"profile_steps: {spec!r} is not FIRST,LAST (e.g. 10,15)")
    first, last = int(match[1]), int(match[2])
    if first < 2 or last < first:
        raise ConfigError(f"profile_steps: {spec!r} needs 2 <= FIRST <= LAST (step 1 compiles "
                          "the step, so it is never traced)")
    return first, last


class StepProfiler:
    """Traces steps FIRST..LAST of `spec` ("FIRST,LAST"; "" traces nothing) into `directory`.

    Step numbers count steps done: the trace starts once FIRST - 1 steps are done (so step
    FIRST is the first one traced) and stops once step LAST and its `outputs` are finished.
    A run resumed inside the range traces what is left of it. After the trace, `summary`
    holds the top ops (see `summarize`).
    """

    def __init__(self, spec: str, directory):
        self.steps = parse_steps(spec)
        self.directory = epath.Path(directory)
        self.summary = None
        self._local = None
        self._traced_from = None
        self._done = False

    @property
    def tracing(self) -> bool:
        return self._local is not None

    def after_step(self, step: int, outputs=None):
        """Starts or stops the trace; `outputs` (any pytree of arrays) of step `step` are
        waited for before the trace stops, so that its device work is in it."""
        if self.steps is None or self._done:
            return
        first, last = self.steps
        if not self.tracing and first - 1 <= step < last:
            jax.block_until_ready(outputs)  # keep earlier steps' device work out of the trace
            self._local = pathlib.Path(tempfile.mkdtemp(prefix="dinov2_jax_trace_"))
            jax.profiler.start_trace(str(self._local), create_perfetto_trace=True)
            self._traced_from = step + 1
        elif self.tracing and step >= last:
            jax.block_until_ready(outputs)
            self._stop(step)

    def close(self, outputs=None):
        """Stops a trace still running (the run ended inside the range) once `outputs` (the
        last step's) are finished; returns `summary`."""
        if self.tracing:
            jax.block_until_ready(outputs)
            self._stop(None)
        return self.summary

    def _stop(self, last_step):
        jax.profiler.stop_trace()
        local, self._local, self._done = self._local, None, True
        steps = None if last_step is None else last_step - self._traced_from + 1
        summary = summarize(local, steps=steps)
        summary["steps"] = [self._traced_from, last_step]
        summary["trace"] = str(self.directory / pathlib.Path(summary["trace"]).relative_to(local))
        (local / "top_ops.json").write_text(json.dumps(summary, indent=1))
        (local / "top_ops.txt").write_text(format_summary(summary))
        for path in local.rglob("*"):
            if path.is_file():
                target = self.directory / str(path.relative_to(local))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
        shutil.rmtree(local)
        self.summary = summary


def _op_events(plane):
    """(op name, self time ns, stats) of the XLA op events of one plane.

    A GPU plane has an "XLA Ops" line (one event per op launch); a host plane of the CPU
    client has op events on its worker threads, marked by an `hlo_op` stat. An event that
    encloses others on its line (a while loop around its body's ops) counts only the time
    that none of them covers, so nothing is counted twice.
    """
    lines = [line for line in plane.lines if line.name == "XLA Ops"] or list(plane.lines)
    for line in lines:
        events = sorted(((event.start_ns, event.end_ns, event.name, dict(event.stats))
                         for event in line.events), key=lambda e: (e[0], -e[1]))
        events = [e for e in events if line.name == "XLA Ops" or "hlo_op" in e[3]]
        covered = [0.0] * len(events)  # time of each event's direct children
        open_events = []  # indices of enclosing events, innermost last
        for index, (start, end, _, _) in enumerate(events):
            while open_events and events[open_events[-1]][1] <= start:
                open_events.pop()
            if open_events:  # a partial overlap (two streams) counts only its overlap
                covered[open_events[-1]] += min(end, events[open_events[-1]][1]) - start
            open_events.append(index)
        for (start, end, name, stats), children in zip(events, covered):
            yield name, max(end - start - children, 0.0), stats


def summarize(trace_dir, steps=None, top=TOP_OPS):
    """Device time per XLA op in the newest trace of `trace_dir` (plugins/profile/RUN/), largest
    first.

    Returns {"trace": the .xplane.pb, "plane": the plane read (the first device plane, else
    the host), "total_ms", "per_step_ms" (when `steps` is given), "ops": [{"op", "ms",
    "count", "percent", "source"}], "categories": [{"category", "ms", "percent"}]}, where
    `source` is the op's framework name when the trace records one (e.g.
    "jit(step)/.../dot_general") and categories are XLA's op classes (GPU traces).
    """
    files = sorted(epath.Path(trace_dir).glob("plugins/profile/*/*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"no .xplane.pb trace under {trace_dir}")
    data = jax.profiler.ProfileData.from_serialized_xspace(files[-1].read_bytes())
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith("/device:") and any(
        line.name == "XLA Ops" for line in p.lines)]
    host = [p for p in planes if p.name.startswith("/host:CPU")]
    candidates = device or host
    plane = candidates[0] if candidates else None
    totals, categories = {}, {}
    for name, duration, stats in (_op_events(plane) if plane is not None else ()):
        entry = totals.setdefault(name, {"op": name, "ns": 0, "count": 0, "source": ""})
        entry["ns"] += duration
        entry["count"] += 1
        entry["source"] = entry["source"] or str(stats.get("tf_op") or stats.get("long_name")
                                                 or "")[:200]
        if "hlo_category" in stats:
            category = str(stats["hlo_category"])
            categories[category] = categories.get(category, 0) + duration
    total = sum(entry["ns"] for entry in totals.values())

    def percent(ns):
        return 100 * ns / total if total else 0.0

    ops = sorted(totals.values(), key=lambda entry: -entry["ns"])[:top]
    return {
        "trace": str(files[-1]), "plane": plane.name if plane is not None else None,
        "total_ms": total / 1e6,
        "per_step_ms": total / 1e6 / steps if steps else None,
        "ops": [{"op": e["op"], "ms": e["ns"] / 1e6, "count": e["count"],
                 "percent": percent(e["ns"]), "source": e["source"]} for e in ops],
        "categories": [{"category": name, "ms": ns / 1e6, "percent": percent(ns)}
                       for name, ns in sorted(categories.items(), key=lambda c: -c[1])],
    }


def format_summary(summary) -> str:
    """The summary as aligned text: one line per op, then one per category."""
    per_step = summary["per_step_ms"]
    lines = [f"{summary['plane']}: {summary['total_ms']:.2f} ms of XLA ops"
             + (f", {per_step:.2f} ms per step" if per_step else ""),
             f"{'ms':>10} {'%':>6} {'count':>6}  op  [source]"]
    for op in summary["ops"]:
        source = f"  [{op['source']}]" if op["source"] else ""
        lines.append(f"{op['ms']:10.3f} {op['percent']:6.2f} {op['count']:6d}  {op['op']}"
                     f"{source}")
    if summary["categories"]:
        lines.append(f"{'ms':>10} {'%':>6}  category")
        lines += [f"{c['ms']:10.3f} {c['percent']:6.2f}  {c['category']}"
                  for c in summary["categories"]]
    return "\n".join(lines) + "\n"
