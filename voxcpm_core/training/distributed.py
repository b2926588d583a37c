"""This process's place in a torchrun job: process group, rank and device, DDP wrapping, reductions.

Without torchrun (``WORLD_SIZE`` unset or 1) every helper is a no-op on a single process, so the
training loop is written once for both.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from voxcpm_core.io.checkpoint import resolve_device

# newer torch turns off only the forward's buffer sync with this; older versions have broadcast_buffers
_DDP_HAS_FORWARD_SYNC = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters


@dataclass
class Dist:
    """Rank ``rank`` of ``world_size`` on ``device`` (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process initialised the group, so it destroys it in close()

    @classmethod
    def from_env(cls) -> Dist:
        """NCCL on CUDA, gloo on CPU; one CUDA device per local rank."""
        device = resolve_device("auto")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.type == "cuda"
        device = torch.device("cuda", local_rank) if cuda else device
        if cuda:
            torch.cuda.set_device(device)
        owns = not torch_dist.is_initialized()
        if owns:
            torch_dist.init_process_group("nccl" if cuda else "gloo")
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), device, owns)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP (gradients all-reduced during backward) in a torchrun job, else ``model`` itself."""
        if not self.enabled:
            return model
        # the buffers (RoPE tables, LoRA scaling) are equal on every rank: never sync them
        no_buffer_sync = {"forward_sync_buffers": False} if _DDP_HAS_FORWARD_SYNC else {"broadcast_buffers": False}
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)

    def syncing(self, wrapped: nn.Module, sync: bool):
        """The context of a backward of ``wrapped`` (from ``wrap``): its gradients are all-reduced only if ``sync``
        (the last micro-batch of a step), the others just accumulate locally."""
        return contextlib.nullcontext() if sync or not self.enabled else wrapped.no_sync()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place."""
        if self.enabled:
            torch_dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (so every rank takes the same branch)."""
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def gather(self, obj) -> list:
        """``obj`` of every rank, by rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
