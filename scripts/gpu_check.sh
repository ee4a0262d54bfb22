#!/usr/bin/env bash
# The one-shot GPU check (persona/gpu_check.py) on a CUDA PyTorch image with no network.
#
#   scripts/gpu_check.sh [WHEELS_DIR] [python -m persona.gpu_check options]
#   WHEELS=DIR scripts/gpu_check.sh [options]
#
# WHEELS_DIR is what scripts/gpu_wheels.sh fetched: its wheels are installed offline into
# /tmp/site and its tokenizer/ replaces the bundled GGUF's. Paths in options are relative to
# the repo root. On the device machine, for example, every row and the kaggle-2xt4 projection:
#   scripts/gpu_check.sh .whl --rows --profile kaggle-2xt4 --json $OUT/gpu_check.json
set -euo pipefail

if [[ $# -gt 0 && -d $1 ]]; then WHEELS=$1; shift; fi
WHEELS=${WHEELS:+$(cd "$WHEELS" && pwd)}  # absolute: the check runs from the repo root
cd "$(dirname "$0")/.."
if [[ -n $WHEELS ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if [[ -d $WHEELS/tokenizer ]]; then set -- --tokenizer "$WHEELS/tokenizer" "$@"; fi
fi
export PYTHONUNBUFFERED=1  # a run cut off at its time limit still shows how far it got
exec python3 -m persona.gpu_check "$@"
