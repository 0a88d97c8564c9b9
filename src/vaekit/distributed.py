"""torch.distributed plumbing: one process or many, with the same calls.

Launched by `torchrun`, every process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment
and joins a process group (nccl on GPUs, gloo on CPU). Alone, every call here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(device_type: str = "cpu") -> "DistContext":
        """Join the process group torchrun set up; alone, a context of one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistContext()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        initialised = False
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
            initialised = True
        return DistContext(rank, world, local_rank, initialised)

    def shutdown(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes, in place (a no-op alone)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_of(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag True on every process if it is True on any (stop/save decisions agree)."""
        if not self.enabled:
            return list(flags)
        values = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in values.tolist()]

    def broadcast_object(self, value):
        """Rank 0's value on every process (only for small, trusted values: run names)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
