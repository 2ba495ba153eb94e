#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: creates the slice (or reuses it if it exists), installs this
# checkout on every worker, and runs the same `python -m dinov2_jax.main` on all of them.
#
#   TPU_NAME=dinov2 ZONE=us-east5-a launch/tpu_pod.sh [--dry-run] [main flags...]
#   TPU_NAME=dinov2 ZONE=us-east5-a ACCELERATOR_TYPE=v5p-256 launch/tpu_pod.sh \
#       --config=configs/vitg14.py --workdir=gs://bucket/vitg14 --config.mesh.data=1 \
#       --config.mesh.fsdp=-1
#
# Environment: TPU_NAME and ZONE (required), ACCELERATOR_TYPE (v5p-256), RUNTIME_VERSION
# (v2-alpha-tpuv5), PROJECT (gcloud's default project if empty), SPOT=1 for a spot slice,
# REMOTE_DIR (dinov2_jax: where the code goes on each worker), JAX_VERSION (0.10.2).
# The workdir and the dataset must be visible to every worker (a gs:// bucket). The code that
# goes out is this checkout's tracked and untracked files (not the ignored ones).
# --dry-run prints every command and runs none.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone, e.g. us-east5-a}"
accelerator=${ACCELERATOR_TYPE:-v5p-256}
runtime=${RUNTIME_VERSION:-v2-alpha-tpuv5}
remote_dir=${REMOTE_DIR:-dinov2_jax}
jax_version=${JAX_VERSION:-0.10.2}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tarball=/tmp/${TPU_NAME}-dinov2_jax.tar.gz

where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")
create_flags=(--accelerator-type="$accelerator" --version="$runtime")
[[ "${SPOT:-0}" == "1" ]] && create_flags+=(--spot)

source "$(dirname "${BASH_SOURCE[0]}")/quoting.sh"
main_flags=$(quoted "$@")
install="mkdir -p $(quoted "$remote_dir") && tar -xzf $(quoted "$(basename "$tarball")") -C $(quoted "$remote_dir") && python3 -m pip install -q \"jax[tpu]==$jax_version\" && python3 -m pip install -q -e $(quoted "$remote_dir")"
run="cd $(quoted "$remote_dir") && DINOV2_JAX_DISTRIBUTED=1 python3 -m dinov2_jax.main $main_flags"

commands=(
  "gcloud compute tpus tpu-vm describe $(quoted "$TPU_NAME" "${where[@]}") > /dev/null 2>&1 || gcloud compute tpus tpu-vm create $(quoted "$TPU_NAME" "${where[@]}" "${create_flags[@]}")"
  "cd $(quoted "$repo") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $(quoted "$tarball") -T -"
  "gcloud compute tpus tpu-vm scp $(quoted "$tarball" "$TPU_NAME:" "${where[@]}") --worker=all"
  "gcloud compute tpus tpu-vm ssh $(quoted "$TPU_NAME" "${where[@]}") --worker=all --command=$(quoted "$install")"
  "gcloud compute tpus tpu-vm ssh $(quoted "$TPU_NAME" "${where[@]}") --worker=all --command=$(quoted "$run")"
)

for command in "${commands[@]}"; do
  if (( dry_run )); then
    echo "$command"
  else
    echo "+ $command" >&2
    bash -c "$command"
  fi
done
