#!/usr/bin/env bash
# One node, all its GPUs: ImageNet-64 consistency training (sCT) with torchrun. The preset picks the
# parallelism (FSDP2 for XL, DDP below) and bf16; train.batch stays the paper's global 2048 whatever
# the GPU count: each GPU runs micro-batches of BATCH_PER_GPU and accumulates
# 2048 / (NGPUS x BATCH_PER_GPU) of them per step, so the hyperparameters never change.
#
#   scmctl data imagenet /datasets/imagenet/train --out /datasets/imagenet64 --resolution 64
#   bash examples/torchrun_single_node.sh /datasets/imagenet64 [more scmctl train options]
#   RUN_DIR=runs/in64-s PRESET=imagenet64-s bash examples/torchrun_single_node.sh /datasets/imagenet64
#
# Re-running the same command resumes from RUN_DIR's latest checkpoint. Ctrl-C or SIGTERM to torchrun
# reaches every process; they agree on the step at which to stop, rank 0 writes a checkpoint, and all
# exit. TORCH_ELASTIC_SHUTDOWN_TIMEOUT is how long torchrun waits for that before it kills them.
set -euo pipefail
data=${1:?usage: bash examples/torchrun_single_node.sh DATA [scmctl train options]}
shift
preset=${PRESET:-imagenet64}
run_dir=${RUN_DIR:-runs/$preset-sct}
ngpus=${NGPUS:-8}
batch_per_gpu=${BATCH_PER_GPU:-32}     # the largest micro-batch that fits in GPU memory
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}

exec torchrun --standalone --nproc_per_node="$ngpus" -m scmctl train \
  --preset "$preset" --data "$data" --run-dir "$run_dir" \
  --set train.batch_per_gpu="$batch_per_gpu" "$@"
