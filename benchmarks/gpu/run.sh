#!/usr/bin/env bash
# The command of a device run: installs the wheels carried in .devref/wheels (the GPU image
# reaches no package registry), records the versions, then runs the suite into RESULTS_DIR.
#
#   bash benchmarks/gpu/run.sh RESULTS_DIR [device_suite.py flags, e.g. --tune]
set -uo pipefail
cd "$(dirname "$0")/../.."
results=${1:?usage: run.sh RESULTS_DIR [device_suite.py flags]}
shift
[ -d .devref/wheels ] && [ -d .devref/torch_ref ] && [ -d .devref/dinov2_src ] || {
  echo "error: .devref is missing: run benchmarks/gpu/prepare.sh here and carry .devref" >&2
  exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/dinov2_site .devref/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/dinov2_site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
exec python3 benchmarks/device_suite.py "$results" --scratch=/tmp/device_suite "$@"
