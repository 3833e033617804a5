#!/bin/bash
# All GPU benchmarks in one lent-machine call, each bounded in time so that the whole stays under
# ~9.5 minutes and a hang in one leaves the others' results. Logs and JSON land in $OUT (8 files).
# Carry the wheels listed in bench/offload_gpu.py (".whl"); the device call is:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash bench/gpu_session.sh
# Dry run here: DRY=1 OUT=/tmp/gpu_dry bash bench/gpu_session.sh (uses .venv/bin/python if present)
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
PY=python3
[ -n "${DRY:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" OUT
SPEED_S=${SPEED_S:-210} LORA_S=${LORA_S:-60} OFFLOAD_S=${OFFLOAD_S:-280}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'diffusers', diffusers.__version__)"
  timeout "$SPEED_S" $PY bench/speed_gpu.py; echo "speed_gpu.py exit $?"
} >"$OUT/speed.log" 2>&1
timeout "$LORA_S" $PY bench/lora_gpu.py >"$OUT/lora.log" 2>&1; echo "lora_gpu.py exit $?" >>"$OUT/lora.log"
BUDGET_S=$((OFFLOAD_S - 60)) timeout "$OFFLOAD_S" $PY bench/offload_gpu.py >"$OUT/offload.log" 2>&1
echo "offload_gpu.py exit $?" >>"$OUT/offload.log"
tail -n 3 "$OUT"/*.log
