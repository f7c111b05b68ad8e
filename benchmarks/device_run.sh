#!/usr/bin/env bash
# The GPU checks of issue 4 in one call: the engine end to end on tiny pipelines (in process, then
# through `accelerate launch` with the FSDP config), and one LoRA step of every full-size architecture.
#   bash benchmarks/device_run.sh [all|engine|fsdp|step]
# Wheels in .whl/ (diffusers, peft, ...) are installed first if present. Logs and JSON go to $OUT.
set -u
WHAT=${1:-all}
OUT=${OUT:-/tmp/sdpo-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"
if [[ $WHAT == all || $WHAT == engine ]]; then
  timeout "${ENGINE_TIMEOUT:-200}" python3 benchmarks/gpu_engine_check.py --json "$OUT/engine.json" > "$OUT/engine.log" 2>&1
  echo "engine check exit $?"; grep -A30 '^| family' "$OUT/engine.log"
fi
if [[ $WHAT != step ]]; then
  timeout "${FSDP_TIMEOUT:-200}" python3 benchmarks/gpu_engine_check.py --families "${FSDP_FAMILIES:-wan,sd}" --skip-in-process \
    --accelerate-config configs/accelerate/fsdp.yaml --json "$OUT/fsdp.json" > "$OUT/fsdp.log" 2>&1
  echo "fsdp check exit $?"; grep -E '^\| |Error|error' "$OUT/fsdp.log" | tail -40
fi
if [[ $WHAT == all || $WHAT == step ]]; then
  timeout "${STEP_TIMEOUT:-400}" python3 -m benchmarks.gpu_step --steps 3 --warmup 1 --json "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log" | grep -v "step [0-9]/\|warm-up"
  echo "gpu_step exit ${PIPESTATUS[0]}"
fi
