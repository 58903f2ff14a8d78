#!/usr/bin/env bash
# Paper-protocol evaluation of a trained run: 50,000 two-step samples per seed set, FID against
# reference statistics (an `scmctl eval ref` file, EDM's cifar10-32x32.npz, EDM2's img64.pkl ...),
# minimum and mean over three seed sets as EDM/EDM2 report, one JSON object per step.
#
#   NGPU=8 bash examples/sample_fid_pipeline.sh RUN_DIR REF [T_MID]
set -euo pipefail
run=$1; ref=$2; t_mid=${3:-1.1}
# Keep the first seed set's samples as one .npz (resumable: re-run after a preemption).
torchrun --standalone --nproc_per_node "${NGPU:-1}" -m scmctl sample "$run" -n 50000 --steps 2 \
  --t-mid "$t_mid" --batch 256 --out "$run/samples-2step.npz" --json > "$run/sample-2step.json"
scmctl eval fid "$run/samples-2step.npz" --ref "$ref" --mode legacy_tensorflow --json \
  | tee "$run/fid-2step-seeds0.json"
# Three seed sets generated on the fly (no files): min and mean.
for steps in 1 2; do
  scmctl eval fid "$run" --ref "$ref" --steps "$steps" --t-mid "$t_mid" --repeat 3 --json \
    | tee "$run/fid-${steps}step.json"
done
