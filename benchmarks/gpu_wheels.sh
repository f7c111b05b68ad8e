#!/usr/bin/env bash
# Fill .whl/ with what the GPU image lacks, for benchmarks/gpu_session.sh (carried: run(carry=[".whl"])):
# diffusers and peft at the versions installed here (the image's are older; transformers 5.17 and
# accelerate 1.15 on it were enough last time), DeepSpeed's pure-Python wheel (built here with its ops
# left to JIT, DS_BUILD_OPS=0) and its small dependencies, msgpack for each Python the image might have.
# About 10 MB, seconds.   bash benchmarks/gpu_wheels.sh [PYTHON]
set -eu
PY=${1:-python3}
mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
"$PY" -m pip download -q --no-deps -d .whl "diffusers==$(version diffusers)" "peft==$(version peft)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==${DEEPSPEED:-0.19.8}" \
  hjson py-cpuinfo ninja nvidia-ml-py einops
for v in 3.10 3.11 3.12 3.13; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" --platform manylinux2014_x86_64 \
    -d .whl msgpack
done
ls .whl
