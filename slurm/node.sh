#!/usr/bin/env bash
# One node's share of slurm/train.sbatch, started by srun as one task per node: torchrun with this node's rank
# (SLURM_PROCID: with one task per node it is the node rank, and SLURM_NTASKS the node count) and static
# rendezvous at the first node (tests/slurm/ runs it on two slurmd nodes of one machine).
# torchrun itself ignores the warning signal (SIGUSR1 reaches every process of the step), so that its workers can
# checkpoint on it instead of being torn down (infra/preemption.py); the workers set their own handler.
set -euo pipefail
trap '' USR1
exec "$DRAFTSMITH_PYTHON" -m torch.distributed.run \
  --nnodes "${SLURM_NTASKS:-1}" --node_rank "${SLURM_PROCID:-0}" --nproc_per_node "$DRAFTSMITH_PROCESSES_PER_NODE" \
  --master_addr "$DRAFTSMITH_MASTER_ADDR" --master_port "$DRAFTSMITH_MASTER_PORT" \
  train/run.py "$@"
