"""Metrics out of the loop: one console line per interval and `metrics.jsonl` in the workdir.

Only process 0 writes. Each JSONL line is a dict with `step` and scalar values; the console
line shows step/total, losses, lr, teacher temperature, img/s, MFU and ETA.
"""
import datetime
import json
import os

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir):
        self._active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")

    def write(self, step, values):
        if not self._active:
            return
        line = {"step": int(step), **{k: _scalar(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def console(self, message):
        if self._active:
            print(message, flush=True)


def _scalar(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


def mean_metrics(history):
    """Mean of each key over a list of metric dicts (host numpy)."""
    return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def format_line(step, total, values, seconds_per_step):
    eta = datetime.timedelta(seconds=int(seconds_per_step * (total - step)))
    mfu = values.get("mfu")
    parts = [
        f"step {step}/{total}",
        f"loss {values['total_loss']:.4f} (dino_local {values['dino_local_crops_loss']:.3f} "
        f"dino_global {values['dino_global_crops_loss']:.3f} ibot {values['ibot_loss']:.3f} "
        f"koleo {values['koleo_loss']:.3f})",
        f"lr {values['lr']:.3g}",
        f"t_temp {values['teacher_temp']:.4f}",
        f"{values['img_per_sec']:.1f} img/s",
        f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a",
        f"ETA {eta}",
    ]
    return " | ".join(parts)
