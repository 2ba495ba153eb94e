"""Multi-host on one machine: 2 JAX processes x 4 fake CPU devices, joined by jax.distributed.

Global batch assembly is checked directly in two processes; then `launch/local_multihost.sh 2`
trains, checkpoints and resumes the tiny config, and must match one process on 8 devices fed
the same global batches. Each host reads its own slice of the data (pipeline: records
[process_index::process_count], seeded per host), so the one-process run reads both hosts'
streams and concatenates them in process order (HOSTS_CONCATENATED below).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from test_parallel import (FAST_COMPILE, REPO, TOLERANCE, max_relative_error, read_losses,
                           read_metrics, read_state)

LAUNCHER = os.path.join(REPO, "launch", "local_multihost.sh")
# Two images per mask group (4 groups per host, one per device; 8 on one 8-device process);
# LayerScale 1.0 for well-conditioned gradients (see test_parallel.TINY).
FLAGS = ["--config=configs/demo.py:tiny", "--config.train.batch_size=16",
         "--config.student.layerscale=1.0",
         "--config.train.log_every=1", "--config.train.checkpoint_every=3",
         "--config.train.total_steps=6", "--config.mesh.data=2", "--config.mesh.fsdp=4"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache, devices=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable,
           "PORT": str(_free_port()), "XLA_FLAGS": FAST_COMPILE,
           "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    return env


def _finish(processes):
    try:
        for process, log in processes:
            if process.wait(timeout=900) != 0:
                with open(log) as f:
                    pytest.fail(f"{' '.join(process.args)} failed:\n{f.read()[-4000:]}")
    finally:
        for process, _ in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _launch(command, env, log):
    with open(log, "w") as f:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True), log


# ------------------------------------------------------------ global batch in two processes

GLOBAL_BATCH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P
    from ml_collections import ConfigDict
    from dinov2_jax import parallel

    parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
    index = jax.process_index()
    mesh = parallel.make_mesh(ConfigDict({"data": 2, "fsdp": 4}))

    def host_batch(host, groups):
        rng = np.random.default_rng(host * 10 + groups)
        return {"global_crops": rng.normal(size=(2, 8, 3, 3, 3)).astype(np.float32),
                "masks": rng.random((2, 8, 9)) < 0.5,
                "mask_indices": rng.integers(0, 100, (groups, 5)).astype(np.int32),
                "masks_weight": rng.random((groups, 5)).astype(np.float32)}

    for groups, spec in ((4, P(("data", "fsdp"))), (1, P())):
        local = host_batch(index, groups)
        shardings = parallel.batch_shardings(mesh, local)
        assert shardings["mask_indices"].spec == spec, shardings["mask_indices"]
        batch = parallel.global_batch(local, shardings)
        hosts = [host_batch(host, groups) for host in range(2)]
        for name, value in batch.items():
            axis = 0 if name in ("mask_indices", "masks_weight") else 1
            expected = np.concatenate([h[name] for h in hosts], axis=axis)
            got = multihost_utils.process_allgather(value, tiled=True)
            assert value.shape == expected.shape, (name, value.shape, expected.shape)
            np.testing.assert_array_equal(got, expected, err_msg=name)
    print("OK", index)
""")


def test_global_batch_joins_the_hosts_in_order(tmp_path):
    """Per-host images become one global batch; the masked-patch groups follow their images,
    sharded when they split over the 8 devices, gathered and replicated when they do not."""
    address = f"localhost:{_free_port()}"
    env = _env(tmp_path / "cache", devices=4)
    processes = [_launch([sys.executable, "-c", GLOBAL_BATCH_SCRIPT, address, str(index)], env,
                         tmp_path / f"process_{index}.log") for index in range(2)]
    _finish(processes)
    for index in range(2):
        assert f"OK {index}" in (tmp_path / f"process_{index}.log").read_text()


# ----------------------------------------------------- training: 2 processes x 4 devices

HOSTS_CONCATENATED = textwrap.dedent("""
    import grain
    import numpy as np
    from dinov2_jax import cli, main
    from dinov2_jax.data import pipeline

    HOSTS = 2
    host_iterator = pipeline.make_train_iterator


    class HostsConcatenated(grain.DatasetIterator):
        # The batches HOSTS processes read, joined in process order: one host's global batch.

        def __init__(self, config, mask_groups, **kwargs):
            super().__init__([host_iterator(config, process_index=i, process_count=HOSTS,
                                            mask_groups=mask_groups // HOSTS, **kwargs)
                              for i in range(HOSTS)])

        def __next__(self):
            batches = [next(parent) for parent in self._parents]
            bad = [record for batch in batches for record in batch.pop(pipeline.BAD_KEY, [])]
            joined = {pipeline.BAD_KEY: bad} if bad else {}
            for name in batches[0]:
                axis = 0 if name in ("mask_indices", "masks_weight") else 1
                joined[name] = np.concatenate([batch[name] for batch in batches], axis=axis)
            return joined

        def get_state(self):
            return {"hosts": [parent.get_state() for parent in self._parents]}

        def set_state(self, state):
            for parent, host_state in zip(self._parents, state["hosts"]):
                parent.set_state(host_state)


    pipeline.make_train_iterator = HostsConcatenated
    cli.run(main.main)
""")


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_and_match_one_process(tmp_path):
    cache = tmp_path / "cache"
    one, two, resumed = tmp_path / "one_process", tmp_path / "two_processes", tmp_path / "resumed"
    _finish([
        _launch([sys.executable, "-c", HOSTS_CONCATENATED, f"--workdir={one}", *FLAGS],
                _env(cache, devices=8), tmp_path / "one_process.log"),
        _launch([LAUNCHER, "2", f"--workdir={two}", *FLAGS], _env(cache),
                tmp_path / "two_processes.log"),
    ])
    shutil.copytree(two / "checkpoints" / "3", resumed / "checkpoints" / "3")
    _finish([_launch([LAUNCHER, "2", f"--workdir={resumed}", *FLAGS], _env(cache),
                     tmp_path / "resumed.log")])

    # Written once: one metrics line per step, one set of checkpoints with both hosts' data
    # iterator states.
    with open(two / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(two / "checkpoints")) == ["3", "6"]
    assert sorted(os.listdir(two / "checkpoints" / "3" / "data_iter")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert "resumed from step 3" in (tmp_path / "resumed.log").read_text()
    assert read_metrics(two)[0] == read_metrics(one)[0]  # the same per-device memory

    reference_losses, reference_state = read_losses(one), read_state(one, 6)
    assert read_losses(two).keys() == reference_losses.keys() == {1, 2, 3, 4, 5, 6}
    assert max_relative_error(read_losses(two), reference_losses) < TOLERANCE
    assert max_relative_error(read_state(two, 6), reference_state) < TOLERANCE
    resumed_losses = read_losses(resumed)
    assert resumed_losses.keys() == {4, 5, 6}
    assert max_relative_error(resumed_losses,
                              {s: reference_losses[s] for s in resumed_losses}) < TOLERANCE
    assert max_relative_error(read_state(resumed, 6), reference_state) < TOLERANCE
    assert np.isfinite(reference_losses[6]["total_loss"])


def _process(launcher, process_id):
    """The PID of the launcher's child that runs --process_id=`process_id`."""
    for _ in range(600):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == launcher.pid and f"--process_id={process_id}".encode() in args:
                return int(entry)
        time.sleep(0.1)
    raise AssertionError(f"no process {process_id} under the launcher")


# SIGTERM lands after the first logged steps and well before the end (checkpoints only on
# preemption and at the end).
PREEMPT_FLAGS = [*FLAGS[:4], "--config.train.checkpoint_every=1000",
                 "--config.train.total_steps=24", *FLAGS[-2:]]


@pytest.mark.slow
def test_sigterm_on_one_host_saves_the_same_step_on_both_and_resumes_exactly(tmp_path):
    """JAX's preemption sync manager: a SIGTERM to process 1 only makes both processes save
    the same step and exit 0; the rerun resumes there and ends where an uninterrupted
    2-process run ends, bit for bit."""
    cache = tmp_path / "cache"
    full, preempted = tmp_path / "full", tmp_path / "preempted"
    _finish([_launch([LAUNCHER, "2", f"--workdir={full}", *PREEMPT_FLAGS], _env(cache),
                     tmp_path / "full.log")])
    launcher, log = _launch([LAUNCHER, "2", f"--workdir={preempted}", *PREEMPT_FLAGS],
                            _env(cache), tmp_path / "preempted.log")
    host_1 = _process(launcher, 1)
    metrics = preempted / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    os.kill(host_1, signal.SIGTERM)
    _finish([(launcher, log)])
    saved = sorted(int(name) for name in os.listdir(preempted / "checkpoints"))
    assert len(saved) == 1 and saved[0] < 24, saved
    # Both hosts wrote their shard of the same step: one data-iterator state each.
    assert sorted(os.listdir(preempted / "checkpoints" / str(saved[0]) / "data_iter")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert f"preempted: saved step {saved[0]}" in log.read_text()
    assert "Reached preemption sync point" in (preempted / "process_1.log").read_text()
    _finish([_launch([LAUNCHER, "2", f"--workdir={preempted}", *PREEMPT_FLAGS], _env(cache),
                     tmp_path / "resumed.log")])
    assert f"resumed from step {saved[0]}" in (tmp_path / "resumed.log").read_text()
    assert read_losses(preempted)[24] == read_losses(full)[24]
    assert max_relative_error(read_state(preempted, 24), read_state(full, 24)) == 0
