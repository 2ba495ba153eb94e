"""launch/: the --dry-run output of each launcher, and local_multihost.sh's process handling.

The printed commands are parsed with shlex (POSIX shell rules), so the tests check what a
shell would run: every main flag must come through intact, however it is quoted.
"""
import os
import shlex
import subprocess
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags with a space, a glob and a quote: they must reach main exactly as given.
MAIN_FLAGS = ["--config=configs/vitg14.py", "--workdir=/runs/a b",
              "--config.train.dataset=arrayrecord:/data/in22k/*.array_record", "--note=it's"]


def _run(script, *args, env=None, check=True):
    result = subprocess.run([os.path.join(REPO, "launch", script), *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _lines(result):
    return [shlex.split(line) for line in result.stdout.splitlines()]


def _flag(words, name):
    return next(w.split("=", 1)[1] for w in words if w.startswith(f"--{name}="))


# ---------------------------------------------------------------------- local_multihost.sh


def test_local_multihost_dry_run_prints_one_process_per_host():
    result = _run("local_multihost.sh", "--dry-run", "3", *MAIN_FLAGS,
                  env={"PORT": "9999", "PYTHON": "/venv/bin/python", "DEVICES_PER_PROCESS": "2",
                       "XLA_FLAGS": "--xla_cpu_foo=1"})
    lines = _lines(result)
    assert len(lines) == 3
    for index, words in enumerate(lines):
        assert words[:4] == ["JAX_PLATFORMS=cpu",
                             "XLA_FLAGS=--xla_force_host_platform_device_count=2 --xla_cpu_foo=1",
                             "/venv/bin/python", "-m"]
        assert words[4:8] == ["dinov2_jax.main", "--coordinator_address=localhost:9999",
                              "--num_processes=3", f"--process_id={index}"]
        flags = words[8:] if index == 0 else words[8:-3]
        assert flags == MAIN_FLAGS
        if index:  # the other processes log next to the workdir
            assert words[-3:] == [">", f"/runs/a b/process_{index}.log", "2>&1"]


@pytest.mark.parametrize("args", [[], ["--dry-run"], ["0"], ["two", "--workdir=x"]])
def test_local_multihost_needs_a_process_count(args):
    result = _run("local_multihost.sh", *args, check=False)
    assert result.returncode == 2
    assert "usage: " in result.stderr


def test_local_multihost_stops_everyone_when_one_process_fails(tmp_path):
    """Process 1 exits with 3 while process 0 would wait forever (as for a coordinator that
    lost a peer): the launcher must return 3 promptly and leave no process behind."""
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        f"echo $$ >> {tmp_path}/pids\n"
        'for arg in "$@"; do [[ $arg == --process_id=1 ]] && sleep 1 && exit 3; done\n'
        "exec sleep 300\n")
    fake_python.chmod(0o755)
    start = time.monotonic()
    result = _run("local_multihost.sh", "3", f"--workdir={tmp_path}",
                  env={"PYTHON": str(fake_python)}, check=False)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - start < 30
    assert "process 1 exited with status 3" in result.stderr
    time.sleep(0.5)
    for pid in (tmp_path / "pids").read_text().split():
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} was left running"


# ----------------------------------------------------------------------------- tpu_pod.sh

TPU_ENV = {"TPU_NAME": "dinov2-test", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5p-128",
           "PROJECT": "my-project", "SPOT": "1"}


def test_tpu_pod_dry_run_creates_installs_and_runs_on_all_workers():
    lines = _run("tpu_pod.sh", "--dry-run", *MAIN_FLAGS, env=TPU_ENV).stdout.splitlines()
    assert len(lines) == 5
    create, pack, copy, install, run = (shlex.split(line) for line in lines)
    where = ["--zone=us-east5-a", "--project=my-project"]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "dinov2-test", *where,
                      ">", "/dev/null", "2>&1", "||",
                      "gcloud", "compute", "tpus", "tpu-vm", "create", "dinov2-test", *where,
                      "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5", "--spot"]
    assert pack[:3] == ["cd", REPO, "&&"] and "/tmp/dinov2-test-dinov2_jax.tar.gz" in pack
    assert copy == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                    "/tmp/dinov2-test-dinov2_jax.tar.gz", "dinov2-test:", *where, "--worker=all"]
    for ssh in (install, run):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dinov2-test"]
        assert "--worker=all" in ssh
    installed = shlex.split(_flag(install, "command"))
    assert "jax[tpu]==0.10.2" in installed and installed[-3:] == ["install", "-e", "dinov2_jax"] \
        or installed[-4:] == ["install", "-q", "-e", "dinov2_jax"]
    remote = shlex.split(_flag(run, "command"))
    assert remote[:7] == ["cd", "dinov2_jax", "&&", "DINOV2_JAX_DISTRIBUTED=1", "python3", "-m",
                          "dinov2_jax.main"]
    assert remote[7:] == MAIN_FLAGS


def test_tpu_pod_packs_this_checkout(tmp_path):
    """The packing command of the dry run, run for real: the archive holds the package."""
    env = {**TPU_ENV, "TPU_NAME": f"pack-test-{os.getpid()}"}
    pack = _run("tpu_pod.sh", "--dry-run", env=env).stdout.splitlines()[1]
    tarball = f"/tmp/{env['TPU_NAME']}-dinov2_jax.tar.gz"
    try:
        subprocess.run(["bash", "-c", pack], check=True, timeout=60)
        names = tarfile.open(tarball).getnames()
    finally:
        if os.path.exists(tarball):
            os.remove(tarball)
    assert {"setup.py", "dinov2_jax/parallel.py", "dinov2_jax/main.py",
            "launch/tpu_pod.sh"} <= set(names)
    assert not any(name.startswith(".git/") for name in names)


def test_tpu_pod_names_missing_settings():
    result = _run("tpu_pod.sh", "--dry-run", env={"TPU_NAME": "", "ZONE": "z"}, check=False)
    assert result.returncode != 0 and "TPU_NAME" in result.stderr


# ----------------------------------------------------------------------- slurm_gpu.sbatch


def test_slurm_dry_run_one_process_per_gpu():
    words, = _lines(_run("slurm_gpu.sbatch", "--dry-run", *MAIN_FLAGS, env={"NODES": "4"}))
    assert words[:7] == ["srun", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                         "--cpus-per-task=12", f"--chdir={REPO}", "--kill-on-bad-exit=1"]
    assert words[7:10] == ["python3", "-m", "dinov2_jax.main"]  # JAX picks GPU SLURM_LOCALID
    assert words[10:] == MAIN_FLAGS


def test_slurm_dry_run_one_process_per_node_inside_an_allocation():
    env = {"SLURM_JOB_NUM_NODES": "32", "NODES": "4", "SLURM_SUBMIT_DIR": "/home/me/dinov2_jax",
           "PYTHON": "/opt/venv/bin/python"}
    words, = _lines(_run("slurm_gpu.sbatch", "--dry-run", "--per-node", *MAIN_FLAGS, env=env))
    assert words[:7] == ["srun", "--nodes=32", "--ntasks-per-node=1", "--gpus-per-node=8",
                         "--cpus-per-task=96", "--chdir=/home/me/dinov2_jax",
                         "--kill-on-bad-exit=1"]
    assert words[7:12] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "/opt/venv/bin/python",
                           "-m", "dinov2_jax.main"]
    assert words[12:] == MAIN_FLAGS


def test_slurm_header_asks_for_8_gpus_per_node():
    with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) as f:
        header = [line.split()[1] for line in f if line.startswith("#SBATCH")]
    assert {"--gpus-per-node=8", "--ntasks-per-node=8", "--exclusive"} <= set(header)
