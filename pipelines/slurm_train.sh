#!/bin/bash
# Multi-node training with SLURM and torchrun: one torchrun per node, one process per GPU.
#
#   sbatch --nodes 2 pipelines/slurm_train.sh segment configs/iunet_brats_like.yaml runs/iunet
#   sbatch --nodes 4 pipelines/slurm_train.sh reconstruct configs/irim_multicoil.yaml runs/irim
#
# Resubmitting the same command resumes from <out>/last.pt. Adjust the #SBATCH lines to the
# cluster (partition, account, time); GPUS_PER_NODE must match --gpus-per-node.
#SBATCH --job-name=medinv-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail

task=${1:?usage: slurm_train.sh segment|reconstruct CONFIG OUT}
config=${2:?config}
out=${3:?output folder}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
PYTHON=${PYTHON:-.venv/bin/python}   # or `python` inside the medinv container

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
resume=()
[ -f "$out/last.pt" ] && resume=(--resume)

srun "$PYTHON" -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$head_node:29500" \
    -m medinv train "$task" --config "$config" --out "$out" "${resume[@]}"
