#!/usr/bin/env bash
# A CI job for scmctl itself or for a model repo: train a teacher and a consistency model on the
# built-in digits for a few steps, distill, sample 1- and 2-step, refine, and compute FID against the
# training images with a detector you provide (a TorchScript module: uint8 NCHW -> (N, D) features),
# e.g. the Inception weights in ~/.cache/scmctl for `--detector inception`. Every step prints one
# JSON object that `jq` (or python) can check; any failure stops the job (set -e).
#
#   bash examples/ci_smoke.sh [WORK_DIR] [DETECTOR]
set -euo pipefail
work=${1:-$(mktemp -d)}
detector=${2:-inception}
small=(--set data.resolution=8 --set network.model_channels=16 --set network.attn_resolutions=[4]
       --set network.head_channels=16 --set train.grid_every=0 --set sample.solver_steps=4 --batch 16)

scmctl train --objective diffusion --run-dir "$work/teacher" --steps 20 "${small[@]}" --json \
  | python -c 'import json,sys; r=json.load(sys.stdin); assert r["steps"]==20, r; print("teacher", r["loss"])'
scmctl distill --teacher "$work/teacher" --run-dir "$work/scd" --steps 20 "${small[@]}" --json >/dev/null
scmctl train --init "$work/teacher" --run-dir "$work/sct" --steps 20 "${small[@]}" --json >/dev/null
for steps in 1 2; do
  scmctl sample "$work/scd" -n 64 --steps "$steps" --out "$work/samples-$steps" --json \
    | python -c 'import json,sys; r=json.load(sys.stdin); print(r["steps"], "steps:", r["count"], "images,", r["nfe"], "NFE")'
done
scmctl refine "$work/sct" "$work/samples-1" --t 0.8 --out "$work/refined" --json >/dev/null
# FID needs a reference with the same detector; the training images themselves serve here.
python - "$work/ref" <<'PY'
import sys
from pathlib import Path
from scmctl.data.datasets import load_dataset
from scmctl.data.imageio import write_png
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
ds = load_dataset(None, 8)
for i, img in enumerate(ds.images[:256]):
    write_png(out / f"{i:05d}.png", img.permute(1, 2, 0).numpy())
PY
scmctl eval fid "$work/samples-2" --ref "$work/ref" --detector "$detector" --allow-small --json
echo "work directory: $work" >&2
