"""Process-group setup for training under ``torchrun`` (or alone), and the few collectives the trainer uses.

:func:`setup_distributed` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); with more
than one process it initialises ``torch.distributed`` (env:// rendezvous) with **nccl** when the process uses
a CUDA device and **gloo** on the CPU. The device is ``cuda:LOCAL_RANK`` when CUDA is present (unless "cpu" is
asked for), else the CPU. Without torchrun it is a single process, rank 0 of 1, and every collective is a
no-op.

Example:
    >>> ctx = setup_distributed("cpu")
    >>> ctx.rank, ctx.world_size, ctx.is_main
    (0, 1, True)
    >>> ctx.all_mean([1.0, 3.0])
    [1.0, 3.0]
    >>> ctx.close()
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["COLLECTIVE_TIMEOUT", "DistContext", "setup_distributed"]

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)
"""How long a collective may wait (the other ranks wait at a barrier while rank 0 validates and saves)."""


@dataclasses.dataclass
class DistContext:
    """This process's place in the run.

    Attributes:
        rank: global rank; world_size: number of processes; local_rank: rank on this node.
        device: the torch device this process computes on.
        owns_group: whether :func:`setup_distributed` created the process group (:meth:`close` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and the final model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_mean(self, values: list[float]) -> list[float]:
        """Element-wise mean of ``values`` over the ranks (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)  # (n,)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def all_min(self, value: int) -> int:
        """Minimum of an int over the ranks."""
        if not self.distributed:
            return int(value)
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device)  # (1,)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {raw!r}") from None


def setup_distributed(device: str = "auto") -> DistContext:
    """This process's :class:`DistContext`; initialises the process group under torchrun (see module doc).

    Args:
        device: "auto" (CUDA when present), "cpu" or "cuda" (raises ValueError without CUDA).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
        )
        owns = True
    elif dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)
