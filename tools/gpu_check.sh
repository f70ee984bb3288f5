#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU as it is (offline, its own python3 and torch).
#   bash tools/gpu_check.sh build-and-test   # wheelhouse, in-place build, GPU tests per backend (<= 5 min)
#   bash tools/gpu_check.sh bench            # the GPU benchmark (<= 5 min)
#   bash tools/gpu_check.sh all | setup      # both | the wheelhouse step alone (no GPU needed)
# Results: $OUT when set, else bench-results/gpu. Design notes: tools/gpu_check.py.
# PYTHON picks the interpreter (default: python3, whose torch is used; no venv is ever made).
set -u
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: no '$PY' interpreter on PATH (set PYTHON=...)" >&2
  exit 2
fi
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONNOUSERSITE=1
exec "$PY" tools/gpu_check.py "$@"
