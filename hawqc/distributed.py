"""Data-parallel runs under ``torchrun``: the process group and the few collectives hawqc needs.

``torchrun --nproc_per_node N ...`` (``python -m torch.distributed.run``) starts N processes with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set. :func:`setup` joins them into the default process
group (nccl where CUDA is available, each process on GPU ``LOCAL_RANK``; gloo otherwise) the first
time a collective entry point runs (QAT, calibration, Hessian traces); a group the caller initialised
is used as it is. Without those variables, or with ``WORLD_SIZE=1``, :class:`World` is the single
process and every collective is the identity.

A global batch of ``n`` samples is split into contiguous shards, rank ``r`` taking the ``r``-th
(:meth:`World.shard`, sizes differing by at most one), so that the ranks together see exactly the
batch one process would, in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The GPU this rank computes on under nccl; None where tensors stay where they are."""
        if self.size > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return None

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items (the first ``n % size`` ranks get one more)."""
        if n < self.size:
            raise ValueError(f"a batch of {n} samples cannot be split over {self.size} ranks: "
                             "make the batch size at least the number of processes (and drop_last=True)")
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks, on ``value``'s device; gradients flow back to every rank's input."""
        if self.size == 1:
            return value
        return _SumOverRanks.apply(value.to(self.device or value.device)).to(value.device)

    def total(self, value: float) -> float:
        """A number summed over the ranks."""
        if self.size == 1:
            return value
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        """``value`` reduced over the ranks with ``op`` ("max" or "min"), no gradient."""
        if self.size == 1:
            return value
        out = value.detach().to(self.device or value.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
        return out.to(value.device)

    def check_same(self, value: float, message: str) -> None:
        """Raise ``ValueError(message)`` on every rank unless all ranks hold the same ``value``."""
        if self.size == 1:
            return
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        if not torch.equal(self.reduce(t, "max"), self.reduce(t, "min")):
            raise ValueError(message)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (a picklable object) on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: each rank's input reaches every rank's output, so its gradient
    is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
        out = value.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(grad)


def setup() -> World:
    """This process's :class:`World`, joining the ``torchrun`` process group on first use."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown() -> None:
    """Leave the process group (before a ``torchrun`` worker exits)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
