"""What every benchmark row records besides its numbers, and the JSON-lines file rows go to.

`device_facts()` names the device and the software (platform, device kind and count, jax and
jaxlib versions). Memory comes from two places: the device allocator's peak since the process
started (`peak_memory_bytes`, None where not reported, e.g. on CPU) and XLA's buffer
assignment of one compiled program (`compiled_peak_bytes`: arguments, outputs and temporaries
live at once), which holds per program even when a process runs several.
"""
import json

import jax
import jaxlib
from etils import epath


def device_facts():
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": jax.default_backend(),
            "devices": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def peak_memory_bytes():
    """The largest peak_bytes_in_use over local devices; None where not reported (CPU)."""
    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use")
             for device in jax.local_devices()]
    peaks = [peak for peak in peaks if peak is not None]
    return max(peaks) if peaks else None


def compiled_peak_bytes(compiled):
    """Peak bytes of one compiled program per device, from XLA's memory analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return stats.peak_memory_in_bytes or (stats.argument_size_in_bytes
                                          + stats.output_size_in_bytes
                                          + stats.temp_size_in_bytes
                                          - stats.alias_size_in_bytes)


def gib(num_bytes):
    return None if num_bytes is None else round(num_bytes / 2**30, 3)


def append_rows(path, rows):
    """Appends each row as one JSON line to `path` (nothing when `path` is empty)."""
    if not path:
        return
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
