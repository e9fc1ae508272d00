"""Multi-process training under torchrun: process group, model wrapping, data sharding.

``torchrun --nproc_per_node N -m medinv train ...`` (or ``--nnodes M ...``) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; the training loops then run one process per GPU (or per
CPU worker with gloo), average gradients with DistributedDataParallel, give each process its
share of the training slices or cases, and let rank 0 alone validate, log and checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(device: torch.device) -> tuple[Distributed | None, torch.device]:
    """Join torchrun's process group where ``WORLD_SIZE`` > 1; returns the job (or None)
    and this process's device (``cuda:LOCAL_RANK`` for CUDA jobs)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return None, device
    job = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda":
        device = torch.device("cuda", job.local_rank % gpus)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend(device.type, local_processes, gpus))
    return job, device


def backend(device_type: str, local_processes: int, gpus: int) -> str:
    """The process group's backends: NCCL for CUDA tensors where each process has a GPU of
    its own (NCCL refuses two ranks on one GPU; gloo then carries CUDA tensors too), gloo
    for CPU tensors (the small control messages of :func:`agree`)."""
    if device_type == "cuda" and local_processes <= gpus:
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def wrap(model: nn.Module, job: Distributed | None, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` in a job, else ``model`` itself."""
    if job is None:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sampler(dataset: Dataset, job: Distributed | None, seed: int) -> DistributedSampler | None:
    """Each process's share of the training data, reshuffled every epoch (``set_epoch``)."""
    if job is None:
        return None
    return DistributedSampler(dataset, job.world_size, job.rank, shuffle=True, seed=seed)


def agree(flag: bool, job: Distributed | None) -> bool:
    """True everywhere if it is True on any process (e.g. rank 0's time budget)."""
    return bool(_reduced(int(flag), job, dist.ReduceOp.MAX))


def largest(value: float, job: Distributed | None) -> float:
    """The largest of the processes' ``value`` (e.g. how far a time-budgeted run is)."""
    return float(_reduced(float(value), job, dist.ReduceOp.MAX))


def smallest(value: int, job: Distributed | None) -> int:
    """The smallest of the processes' ``value`` (e.g. a micro-batch each one planned)."""
    return int(_reduced(int(value), job, dist.ReduceOp.MIN))


def _reduced(value: int | float, job: Distributed | None, op) -> int | float:
    """``value`` reduced over the processes with ``op`` (as it is without a job); floats
    travel in float64, integers in int64."""
    if job is None:
        return value
    dtype = torch.float64 if isinstance(value, float) else torch.int64
    tensor = torch.tensor([value], dtype=dtype)
    dist.all_reduce(tensor, op=op)
    return tensor.item()


def finish(job: Distributed | None) -> None:
    if job is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
