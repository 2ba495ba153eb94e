"""Metrics out of the loop: one console line per interval, `metrics.jsonl` in the workdir, and
TensorBoard event files beside it when the `tensorboard` extra is installed.

Only process 0 writes. Each JSONL line is a dict with `step` and scalar values; the console
line shows step/total, losses, lr, teacher temperature, the teachers' entropies (per image /
of the batch mean, as fractions of log K, for the DINO and iBOT heads), img/s, MFU and ETA. The workdir is an
`etils.epath` path: a local file is appended to; an object store (gs://) cannot append, so
there the file is rewritten whole at each write. TensorBoard events are written for local
workdirs (tensorboardX writes local files only).
"""
import datetime
import json
import numbers

import jax
import numpy as np
from etils import epath

try:  # The optional `tensorboard` extra: event files without TensorFlow.
    from tensorboardX import SummaryWriter
except ImportError:
    SummaryWriter = None


class MetricWriter:
    def __init__(self, workdir):
        self._active = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._local = "://" not in str(self.path)
        self._lines = None  # what a rewritten (object store) file holds
        self._tensorboard = None  # made at the first write: a run that fails first leaves none

    def write(self, step, values):
        if not self._active:
            return
        line = {"step": int(step), **{k: _scalar(v) for k, v in values.items()}}
        text = json.dumps(line) + "\n"
        if self._local:
            with self.path.open("a") as f:
                f.write(text)
        else:
            if self._lines is None:
                self._lines = self.path.read_text() if self.path.exists() else ""
            self._lines += text
            self.path.write_text(self._lines)
        if self._tensorboard is None and SummaryWriter is not None and self._local:
            self._tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))
        if self._tensorboard is not None:
            for name, value in line.items():
                if name != "step" and isinstance(value, numbers.Real):
                    self._tensorboard.add_scalar(name, value, int(step))
            self._tensorboard.flush()

    def close(self):
        if self._tensorboard is not None:
            self._tensorboard.close()

    def console(self, message):
        if self._active:
            print(message, flush=True)


def _scalar(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


def mean_metrics(history):
    """Mean of each key over a list of metric dicts (host numpy)."""
    return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


# (metric, console name) of the loss terms, in console order; a step logs some of them.
LOSS_PARTS = (("dino_local_crops_loss", "dino_local"), ("dino_global_crops_loss", "dino_global"),
              ("ibot_loss", "ibot"), ("koleo_loss", "koleo"), ("feature_cls_loss", "cls"),
              ("feature_patch_loss", "patch"), ("gram_loss", "gram"))


def format_line(step, total, values, seconds_per_step):
    eta = datetime.timedelta(seconds=int(seconds_per_step * (total - step)))
    mfu = values.get("mfu")
    # One student: unprefixed losses; several (distillation.students): NAME/total_loss ...
    prefixes = sorted(key.removesuffix("total_loss") for key in values
                      if key.endswith("total_loss"))
    parts = [f"step {step}/{total}"] + [
        f"{prefix.replace('/', ' ')}loss {values[prefix + 'total_loss']:.4f} ("
        + " ".join(f"{short} {values[prefix + key]:.3f}" for key, short in LOSS_PARTS
                   if prefix + key in values) + ")" for prefix in prefixes] + [
        f"lr {values[prefixes[0] + 'lr']:.3g}",
        f"t_temp {values['teacher_temp']:.4f}",
    ]
    if "dino/entropy" in values:  # a teacher with heads
        parts.append(f"H/logK dino {values['dino/entropy']:.2f}/"
                     f"{values['dino/batch_entropy']:.2f} ibot {values['ibot/entropy']:.2f}/"
                     f"{values['ibot/batch_entropy']:.2f}")
    parts += [
        f"{values['img_per_sec']:.1f} img/s",
        f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a",
        f"ETA {eta}",
    ]
    return " | ".join(parts)
