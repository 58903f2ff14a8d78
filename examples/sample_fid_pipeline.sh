#!/usr/bin/env bash
# Paper-protocol evaluation of a trained run: 50,000 two-step samples, then FID against reference
# statistics (e.g. EDM's cifar10-32x32.npz with mu/sigma), reporting one JSON line per metric.
#
#   bash examples/sample_fid_pipeline.sh RUN_DIR REF.npz [T_MID]
set -euo pipefail
run=$1; ref=$2; t_mid=${3:-1.1}
scmctl sample "$run" -n 50000 --steps 2 --t-mid "$t_mid" --batch 256 --out "$run/samples-2step" --json \
  > "$run/sample-2step.json"
scmctl eval fid "$run/samples-2step" --ref "$ref" --mode legacy_tensorflow --json | tee "$run/fid-2step.json"
