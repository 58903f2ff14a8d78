#!/usr/bin/env bash
# Multi-node scmctl training under SLURM: one torchrun per node (srun), one process per GPU,
# rendezvous on the job's first node. Submit with the dataset and a run directory on a file
# system every node sees:
#
#   DATA=/shared/imagenet512-latents RUN_DIR=/shared/runs/in512-sct sbatch examples/slurm_multinode.sh
#   DATA=... RUN_DIR=... COMMAND=distill sbatch examples/slurm_multinode.sh --teacher /shared/runs/in512-edm
#
# Time limit: SLURM sends USR1 to this script LEAD seconds before the limit (--signal below); the
# trap sends SIGTERM to every torchrun, which forwards it to its processes: they finish the current
# step, agree on it (one all-reduce per step), rank 0 writes a checkpoint, and all exit. The job is
# then requeued (--requeue) and the next run of this same script resumes from RUN_DIR.
# Preemption: SLURM's own SIGTERM reaches torchrun the same way within the partition's GraceTime,
# and a job submitted with --requeue goes back to the queue by itself.
#
#SBATCH --job-name=scmctl
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
: "${DATA:?set DATA to the dataset (a folder written by scmctl data ...)}"
: "${RUN_DIR:?set RUN_DIR to a run directory on a shared file system}"
command=${COMMAND:-train}                   # train (sCT, or --objective diffusion) | distill (sCD)
preset=${PRESET:-imagenet512}
gpus_per_node=${GPUS_PER_NODE:-8}
batch_per_gpu=${BATCH_PER_GPU:-32}          # the largest micro-batch that fits; train.batch stays global

master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
master_port=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# How long torchrun lets its processes checkpoint after SIGTERM before it kills them (< the lead of
# --signal above, which is what remains of the time limit).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}

stop_and_requeue() {
  echo "$(date -Is) time limit near: asking scmctl to checkpoint and stop"
  scancel --signal=TERM "$SLURM_JOB_ID"     # SIGTERM to the job's tasks (each torchrun), not to this script
  wait "$srun_pid" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap stop_and_requeue USR1

echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes x $gpus_per_node GPUs, rendezvous $master_addr:$master_port"
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$gpus_per_node" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$master_addr:$master_port" \
  -m scmctl "$command" --preset "$preset" --data "$DATA" --run-dir "$RUN_DIR" \
  --set train.batch_per_gpu="$batch_per_gpu" "$@" &
srun_pid=$!
wait "$srun_pid"
