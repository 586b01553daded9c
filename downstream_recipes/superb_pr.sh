#!/usr/bin/env bash
# SUPERB PR with s3prl's own run_downstream: prepare data and config, train, evaluate on test-clean,
# write OUT/result.json. All the logic is in superb.py (python $PYTHON, default: python on PATH).
#   superb_pr.sh --upstream NAME [--ckpt FILE] --librispeech ROOT --out DIR [--steps N]
#                [--s3prl-src DIR] [--set KEY=VALUE ...] [--smoke] [--device auto|cpu|cuda]
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/superb.py" pr "$@"
