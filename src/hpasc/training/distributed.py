"""Device choice and DDP: one process per device under ``torchrun`` (NCCL on CUDA, gloo on CPU).

Without ``WORLD_SIZE`` > 1 in the environment everything here is a no-op for a single process, so the
training loop has one code path. Launch: ``torchrun --nproc_per_node 2 -m hpasc train configs/b0.yaml``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among ``world`` processes, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """The training device by the project's one rule (``hpasc.device``): ``auto`` -> the local rank's GPU
    when CUDA is available, else CPU."""
    from ..device import resolve_device

    return resolve_device(pref, local_rank, where="train.device")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group described by the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, …)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # a long timeout: the other ranks wait while rank 0 segments and crops the training set once
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(hours=12))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (early-stopping decisions, metrics)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor of running sums over processes (for logging)."""
    if not info.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.world


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
