#!/usr/bin/env bash
# One device run: train_step.py for the cifar10 preset (fp32) and imagenet512-s (bf16, fp32 tangent)
# on a GPU; images/s per GPU and ratios to the diffusion step. Logs go to $OUT.
#   OUT=/tmp/out bash benchmarks/device_train_step.sh
set -u -o pipefail
OUT=${OUT:-/tmp/train_step_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
run() { echo "== $*"; timeout 100 $PY benchmarks/train_step.py --device cuda --threads 8 --steps 5 --warmup 2 "$@" 2>&1 | grep -v Warning; }
{
  nvidia-smi --query-gpu=name --format=csv,noheader
  run --preset cifar10 --batch 128
  run --preset imagenet512-s --batch 32
} | tee "$OUT/train_step.log"
