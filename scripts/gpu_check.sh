#!/usr/bin/env bash
# The prepared GPU check (ftx.gpucheck): bf16 LoRA training tokens/s and peak VRAM with transformers + peft, QLoRA
# NF4 and Unsloth where installed, the memory planner's estimate against each measured peak; one JSON.
#
#   scripts/gpu_check.sh [--out gpu_check.json]     # on a machine with one CUDA GPU, ~2-5 minutes
#   scripts/gpu_check.sh --dry-run --out x.json     # the same code path on CPU with a tiny model (the tests)
#   scripts/gpu_check.sh --wheels DIR               # download what a GPU machine without internet lacks, into DIR
#
# It runs from the repository (PYTHONPATH=src): ftx need not be installed. A GPU machine usually has torch,
# transformers, peft and accelerate; this needs pydantic and numpy besides, and bitsandbytes / unsloth for the
# QLoRA / Unsloth rows. Missing required packages are listed with the command that fetches them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
NEEDED="torch transformers peft accelerate pydantic numpy safetensors"
OPTIONAL="bitsandbytes unsloth"

if [ "${1:-}" = "--wheels" ]; then
  dir="${2:?--wheels DIR}"
  mkdir -p "$dir"
  # the small pure-Python pieces a CUDA image may lack (torch and CUDA libraries are the machine's own)
  "$PY" -m pip download -q --no-deps -d "$dir" pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions peft accelerate bitsandbytes
  du -ch "$dir"/*.whl | tail -n 1 | awk '{print "wheels: " $1 " in total"}'
  ls -1 "$dir"
  exit 0
fi

missing=""
for m in $NEEDED; do
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$m') is None)" || missing="$missing $m"
done
if [ -n "$missing" ]; then
  echo "gpu_check: missing packages:$missing" >&2
  echo "  fetch them where there is internet: scripts/gpu_check.sh --wheels wheels/ ; then pip install wheels/*.whl" >&2
  exit 2
fi
for m in $OPTIONAL; do
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$m') is None)" \
    || echo "gpu_check: $m not installed: its row is skipped" >&2
done
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} exec "$PY" -m ftx.gpucheck "$@"
