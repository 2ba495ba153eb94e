#!/usr/bin/env bash
# Runs N JAX processes of `python -m dinov2_jax.main` on this machine, on CPU, as if they were N
# hosts: each process gets DEVICES_PER_PROCESS fake CPU devices and joins jax.distributed
# through --coordinator_address/--num_processes/--process_id. For testing multi-host code paths.
#
#   launch/local_multihost.sh [--dry-run] N [main flags...]
#   launch/local_multihost.sh 2 --config=configs/demo.py:tiny --workdir=/tmp/mh
#
# Environment: DEVICES_PER_PROCESS (4), PORT (coordinator port, 8476), PYTHON (python3),
# LOG_DIR (where process i>0 writes process_i.log; default: the --workdir, else .), and
# XLA_FLAGS, which each process gets after the fake device count.
# Process 0 prints to this terminal. --dry-run prints the commands and runs nothing. The exit
# status is the first non-zero one among the processes; if one fails, the others are stopped.
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] N [main flags...]" >&2
  exit 2
}

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
shift

devices=${DEVICES_PER_PROCESS:-4}
port=${PORT:-8476}
python=${PYTHON:-python3}
log_dir=${LOG_DIR:-}
if [[ -z "$log_dir" ]]; then
  log_dir=.
  for flag in "$@"; do
    [[ "$flag" == --workdir=* ]] && log_dir=${flag#--workdir=}
  done
fi

source "$(dirname "${BASH_SOURCE[0]}")/quoting.sh"

xla_flags="--xla_force_host_platform_device_count=$devices${XLA_FLAGS:+ $XLA_FLAGS}"

# Sets `main` to process $1's command line (the remaining arguments are main's flags).
main_for() {
  local id=$1
  shift
  main=("$python" -m dinov2_jax.main --coordinator_address="localhost:$port"
        --num_processes="$num_processes" --process_id="$id" "$@")
}

if (( dry_run )); then
  for (( id = 0; id < num_processes; id++ )); do
    main_for "$id" "$@"
    line="JAX_PLATFORMS=cpu XLA_FLAGS=$(quoted "$xla_flags") $(quoted "${main[@]}")"
    (( id == 0 )) || line+=" > $(quoted "$log_dir/process_$id.log") 2>&1"
    echo "$line"
  done
  exit 0
fi

mkdir -p "$log_dir"
declare -A running  # pid -> process id
stop_all() {
  local pid
  for pid in "${!running[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap stop_all INT TERM

for (( id = 0; id < num_processes; id++ )); do
  main_for "$id" "$@"
  if (( id == 0 )); then
    JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags "${main[@]}" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags "${main[@]}" > "$log_dir/process_$id.log" 2>&1 &
  fi
  running[$!]=$id
done

status=0
while (( ${#running[@]} > 0 )); do
  sleep 0.2
  for pid in "${!running[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    code=0
    wait "$pid" || code=$?
    id=${running[$pid]}
    unset "running[$pid]"
    if (( code != 0 && status == 0 )); then
      status=$code
      echo "local_multihost: process $id exited with status $code; stopping the others" >&2
      stop_all
    fi
  done
done
exit "$status"
