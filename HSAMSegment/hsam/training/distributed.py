"""Training under ``torchrun``: the process group, each process's device and share of every epoch's
slices, and values agreed between processes."""

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime.devices import select_device


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 of one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class _Distributed:
    rank: int = 0
    world_size: int = 1
    created_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _start_distributed(device: torch.device) -> _Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed()
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return _Distributed(dist.get_rank(), dist.get_world_size(), created)


def _select_device(name: str) -> torch.device:
    device = select_device(name)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _all_reduce(values: list[float], device: torch.device, op) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _epoch_order(count: int, epoch: int, seed: int, ddp: _Distributed) -> list[int]:
    """This process's share of a shuffle shared by all processes, padded to equal lengths."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    per_rank = math.ceil(count / ddp.world_size)
    order = (order * ddp.world_size)[: per_rank * ddp.world_size]
    return order[ddp.rank :: ddp.world_size]
