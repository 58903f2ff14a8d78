#!/usr/bin/env bash
# One device run: 2-step sampling throughput against the network's forward throughput, and feature
# extraction throughput, on a GPU (CIFAR-10 preset network; ImageNet-64 at EDM2-S width). Logs go to $OUT.
#   OUT=/tmp/out bash benchmarks/device_sample_eval.sh
set -u -o pipefail
OUT=${OUT:-/tmp/sample_eval_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
run() { echo "== $*"; timeout 150 $PY benchmarks/sample_eval.py --device cuda --threads 8 "$@" 2>&1; }
{
  nvidia-smi --query-gpu=name --format=csv,noheader
  run --preset cifar10 --batch 256 --iters 10 --png
  run --preset cifar10 --batch 256 --iters 10 --no-features --no-prefetch
  run --preset cifar10 --batch 256 --iters 10 --no-features --dtype bf16
  run --preset imagenet64-s --batch 64 --iters 6 --no-features
} | tee "$OUT/sample_eval.log"
