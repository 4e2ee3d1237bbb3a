#!/usr/bin/env bash
# End-to-end GPU check of pulid_lab's real tier from local weights (see `scripts/gpu_check.sh --help`).
#   SDXL_DIR=... LIGHTNING_UNET=... ANTELOPEV2_ROOT=... [EVA_CLIP=...] [PULID_V1=...] [FACE_DIR=...] \
#     scripts/gpu_check.sh [--stage1-only]
# Runs under `timeout ${GPU_CHECK_TIMEOUT:-600}` seconds with ${PYTHON:-python}; output in ${OUT:-gpu_check_out}.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"
for arg in "$@"; do
  case "$arg" in -h|--help|--check-only) exec "$py" "$here/gpu_check.py" "$@";; esac
done
missing=()
for v in SDXL_DIR LIGHTNING_UNET ANTELOPEV2_ROOT; do
  [ -n "${!v:-}" ] || missing+=("$v")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu_check.sh: set ${missing[*]} (paths to local weights; see: $0 --help)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$py" "$here/gpu_check.py" "$@"
