"""Process-group helpers: one place that knows whether this is one process or a torchrun/deepspeed launch.

    torchrun --nproc_per_node 2 train/run.py +experiment=... stages=[distill] deepspeed=zero2
    deepspeed --num_gpus 2 --no_local_rank train/run.py +experiment=... stages=[distill] deepspeed=zero2

Launchers set RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op for a single process.
The backend is NCCL when CUDA is available, else gloo (CPU; what CI uses).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether a distributed launcher (torchrun, deepspeed, srun with the variables set) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main() -> bool:
    return rank() == 0


def init(timeout_minutes: int = 60) -> None:
    """Join the process group the launcher set up (once); pins each rank to its own GPU when there are GPUs."""
    if world_size() == 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


def shutdown() -> None:
    """Leave the process group (if this process joined one) before the interpreter exits, so no communication
    thread is torn down by the exit itself: a gloo rank once aborted there (`terminate called without an active
    exception`, exit -6) after its work was done and saved."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (for logging); returns them unchanged on one process."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast_object(value: object) -> object:
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
