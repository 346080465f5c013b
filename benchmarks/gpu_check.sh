#!/usr/bin/env bash
# Issue 11, item 5, in one call of the workplace's GPU machine: seconds per DiffusionOPD and GRPO
# step, peak memory and achieved TFLOP/s on the SD3.5-Medium-sized random pipeline (bf16, 512 px,
# LoRA r32, micro-batch 8), then the rollout against the plain pipeline call. Results go to $OUT
# (the device tool sets it; else /tmp/gpu_check). The GPU image lacks diffusers, open_clip and rapidocr; from the project root
# on the CPU machine:
#
#   mkdir -p .whl && cp ../shared/wheels/*.whl .whl/      # /.whl/ is git-ignored
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540
#
# SIZE, DEVICE, DTYPE and PYTHON override the defaults (sd35m, cuda, bfloat16, python3): SIZE=tiny DEVICE=cpu
# DTYPE=float32 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh checks the script itself on a CPU.
set -euo pipefail
SIZE=${SIZE:-sd35m} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} PYTHON=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check}
mkdir -p "$OUT"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
fi
# An install maps trainers/ and baselines/ to opd_bench.trainers / opd_bench.baselines; on a bare
# PYTHONPATH they must sit inside the package, so a copy of it is assembled beside the wheels.
cp -r opd_bench "$site/opd_bench"
cp -r trainers "$site/opd_bench/trainers"
cp -r baselines "$site/opd_bench/baselines"
export PYTHONPATH=$site
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/environment.txt"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/environment.txt"; fi
# a step of each method, then a step's FLOPs; the first figures land before a time-out could cut the rest
timeout 300 "$PYTHON" benchmarks/bench_train_step.py --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --steps 3 \
  | tee "$OUT/train_step.jsonl"
timeout 150 "$PYTHON" benchmarks/bench_rollout.py --size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --repeats 3 \
  | tee "$OUT/rollout.txt"
