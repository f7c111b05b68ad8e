#!/usr/bin/env bash
# The GPU checks of issue 21 in one call, under a total budget (BUDGET seconds, default 470: 8 minutes of
# device time less the start-up): every part gets min(its own timeout, what is left) and a part that
# cannot get MIN_PART seconds is skipped, so the script ends in time whatever hangs.
#
#   bash benchmarks/gpu_session.sh                   # PARTS="steps nockpt deepspeed generate"
#   PARTS="steps compile" bash benchmarks/gpu_session.sh
#   DRY_RUN=1 bash benchmarks/gpu_session.sh         # the same Python code paths on a CPU, tiny models (seconds)
#
# Parts (results in $OUT: one log and one JSON per part, and summary.md):
#   steps     LoRA Diffusion-DPO step of CogVideoX-5B, Wan2.1-1.3B and SD1.5 with gradient checkpointing:
#             s/step, peak GB, the FLOPs one eager step counts, model TFLOP/s and MFU (model FLOPs from
#             benchmarks/results/step-flops.json), and which SDPA kernel ran
#   nockpt    the same without gradient checkpointing (an OOM is reported as a row, not raised)
#   compile   CogVideoX-5B with each transformer block torch.compile'd (regional), checkpointing on
#   deepspeed `sdpo train` through `accelerate launch` with configs/accelerate/deepspeed-zero2.yaml on one GPU
#             (tiny SD pipeline, LoRA and full; benchmarks.gpu_engine_check)
#   generate  `sdpo generate` against CogVideoXPipeline called directly, CogVideoX-2B at 49x480x720, 50 steps,
#             random weights at full size (benchmarks.full_pipeline); target ratio <= 1.02
#
# What the device lacks travels in .whl/: `bash benchmarks/gpu_wheels.sh` fills it here (diffusers and peft
# at this machine's versions, DeepSpeed's pure-Python wheel and its small dependencies, msgpack for each
# Python the device might have; about 10 MB), then carry it with the run (run(carry=[".whl"])). Each wheel
# is installed with --no-index before anything runs; one that does not fit the device's Python is reported
# and skipped. Without DeepSpeed the deepspeed part fails on its own (logged) and the other parts still run.
set -u
OUT=${OUT:-/tmp/sdpo-gpu}
BUDGET=${BUDGET:-470}
MIN_PART=${MIN_PART:-30}
DRY_RUN=${DRY_RUN:-0}
PARTS=${PARTS:-steps nockpt deepspeed generate}
MODELS=${MODELS:-cogvideox-5b,wan2.1-1.3b,sd15}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  for wheel in .whl/*.whl; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
      2>/dev/null || echo "not installed (another Python's or platform's wheel): $wheel"
  done
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.md"
: > "$SUMMARY"

if [[ $DRY_RUN == 1 ]]; then
  STEP_ARGS=(--tiny --device cpu --weight-repeats 2)
  COMPILE_BACKEND=eager  # dynamo's tracing without inductor's code generation: the code path in seconds
  GEN_ARGS=(--height 16 --width 16 --frames 5 --steps 2 --warmup-steps 1 --dtype fp32)
  TINY=(--tiny)
  echo "dry run: tiny models on the CPU" | tee -a "$SUMMARY"
else
  STEP_ARGS=(--model-flops benchmarks/results/step-flops.json)
  COMPILE_BACKEND=inductor
  GEN_ARGS=(--height 480 --width 720 --frames 49 --steps 50 --warmup-steps 2 --dtype bf16)
  TINY=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$SUMMARY"
  $PY -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$SUMMARY"
fi

# part NAME TIMEOUT COMMAND...: runs COMMAND with min(TIMEOUT, time left), logs to $OUT/NAME.log.
part() {
  local name=$1 limit=$2
  shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  local left=$((BUDGET - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < MIN_PART)); then
    echo "$name: skipped, ${left}s of the budget left" | tee -a "$SUMMARY"
    return 0
  fi
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start))s (limit ${limit}s)" | tee -a "$SUMMARY"
  grep -E '^\| |ratio|attention kernel|compile|Error' "$OUT/$name.log" | tail -25 | tee -a "$SUMMARY"
}

STEP=($PY -m benchmarks.gpu_step --models "$MODELS" --method diffusion-dpo --steps 2 --warmup 0 "${STEP_ARGS[@]}")
part steps 140 "${STEP[@]}" --json "$OUT/steps.json"
part nockpt 110 "${STEP[@]}" --no-checkpointing --json "$OUT/nockpt.json"
part compile 150 $PY -m benchmarks.gpu_step --models "${COMPILE_MODELS:-cogvideox-5b}" --method diffusion-dpo \
  --steps 2 --warmup 1 --compile --compile-backend "$COMPILE_BACKEND" "${STEP_ARGS[@]}" --json "$OUT/compile.json"
if [[ $DRY_RUN == 1 ]]; then
  [[ " $PARTS " == *" deepspeed "* ]] && echo "deepspeed: skipped in a dry run (needs a GPU)" | tee -a "$SUMMARY"
else
  part deepspeed 90 $PY benchmarks/gpu_engine_check.py --families sd --skip-in-process --steps 2 \
    --accelerate-config configs/accelerate/deepspeed-zero2.yaml --num-processes 1 --json "$OUT/deepspeed.json"
fi
MODEL_DIR="$OUT/cogvideox-2b"  # gigabytes of random weights: removed after the part, nothing to bring back
part generate 200 bash -c "$PY -m benchmarks.full_pipeline '$MODEL_DIR' ${TINY[*]} && \
  $PY -m benchmarks.generate_speed --family cogvideox --pretrained '$MODEL_DIR' ${GEN_ARGS[*]} --prompts 1 \
  --per-prompt 1 --batch-size 1 --repeats 1 --json '$OUT/generate.json'"
rm -rf "$MODEL_DIR"
echo "total ${SECONDS}s of a ${BUDGET}s budget" | tee -a "$SUMMARY"
