#!/bin/bash
# GPU benchmarks in one lent-machine call, each bounded in time so that a hang in one leaves the
# others' results. Logs and JSON land in $OUT (at most 8 files come back: keep PARTS to what fits).
# PARTS picks and orders them (default: the first four; ~8 min on an H100/H200 with the default limits;
# "image" (bench/image_gpu.py), "turbo" (bench/turbo_gpu.py) and "control" (bench/control_gpu.py) run only
# when named).
# Carry the wheels listed in bench/offload_gpu.py (".whl"); the device call is:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PARTS="service offload" bash bench/gpu_session.sh
# speed_gpu.py's SKIP="section ..." leaves out sections an earlier run measured.
# Dry run here: DRY=1 OUT=/tmp/gpu_dry bash bench/gpu_session.sh (uses .venv/bin/python if present)
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
PY=python3
[ -n "${DRY:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" OUT
PARTS=${PARTS:-"speed lora offload service"}
# offload and service write the same model files (1-2 min): the first writes, the next reuses
export KEEP=1 REUSE_MODELS=1
SPEED_S=${SPEED_S:-150} LORA_S=${LORA_S:-60} OFFLOAD_S=${OFFLOAD_S:-260} SERVICE_S=${SERVICE_S:-300}
IMAGE_S=${IMAGE_S:-300} TURBO_S=${TURBO_S:-300} CONTROL_S=${CONTROL_S:-420}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'diffusers', diffusers.__version__)"; } >"$OUT/machine.log" 2>&1
for part in $PARTS; do
  case $part in
    speed) limit=$SPEED_S; script=bench/speed_gpu.py ;;
    lora) limit=$LORA_S; script=bench/lora_gpu.py ;;
    offload) limit=$OFFLOAD_S; script=bench/offload_gpu.py; export BUDGET_S=$((OFFLOAD_S - 60)) ;;
    service) limit=$SERVICE_S; script=bench/service_gpu.py ;;
    image) limit=$IMAGE_S; script=bench/image_gpu.py ;;
    turbo) limit=$TURBO_S; script=bench/turbo_gpu.py ;;
    control) limit=$CONTROL_S; script=bench/control_gpu.py ;;
    *) echo "unknown part $part" >>"$OUT/machine.log"; continue ;;
  esac
  # its own session (setsid: the session id is its pid), so that what it started can be killed, and only that
  setsid timeout "$limit" $PY "$script" >"$OUT/$part.log" 2>&1 &
  sid=$!
  wait "$sid"
  echo "$script exit $?" >>"$OUT/$part.log"
  # a part cut by its limit can leave its CLI child exiting, holding the card: the next part's baseline
  pkill -KILL -s "$sid" 2>/dev/null; sleep 1
done
# KEEP_WORK=1 leaves the model files for a next call on the same (warm) machine
[ -z "${KEEP_WORK:-}" ] && rm -rf "${WORK:-/tmp/zimage_offload_bench}" /tmp/zimage_offload_dry
tail -n 3 "$OUT"/*.log
