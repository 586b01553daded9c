#!/usr/bin/env bash
# SUPERB PR with s3prl's own run_downstream: prepare data and config, train, evaluate on test-clean,
# write OUT/result.json. All the logic is in superb.py, run by the Python of the environment s3prl-laser
# is installed in (find_python.sh: $PYTHON, else the active venv, python on PATH, a venv in this repository).
#   superb_pr.sh --upstream NAME [--ckpt FILE] --librispeech ROOT --out DIR [--steps N]
#                [--s3prl-src DIR] [--set KEY=VALUE ...] [--smoke] [--device auto|cpu|cuda]
set -euo pipefail
source "$(dirname "$0")/find_python.sh"
python="$(recipe_python)" || exit 2
exec "$python" "$(dirname "$0")/superb.py" pr "$@"
