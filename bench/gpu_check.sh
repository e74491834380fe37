#!/usr/bin/env bash
# The GPU check in one command: every GPU path of the recipe, figures in --output_dir (bench/README.md, GPU check).
#   bash bench/gpu_check.sh --output_dir gpu_check                  # on one GPU, within 8 minutes on an H200
#   bash bench/gpu_check.sh --wheels wheels --output_dir gpu_check  # install the carried pinned wheels first
#   bash bench/gpu_check.sh --dry_run --output_dir out              # every step on the CPU at tiny sizes
# Exit status: 0 when no step failed, 1 when one did (each step's JSON says which and why), 2 for a bad flag.
set -euo pipefail
PYTHON="${PYTHON:-python}"
if ! command -v "$PYTHON" >/dev/null; then
    echo "gpu_check: error: no $PYTHON on PATH (set PYTHON=/path/to/python)" >&2
    exit 2
fi
exec "$PYTHON" "$(dirname "$0")/gpu_check.py" "$@"  # paths are taken from the caller's folder
