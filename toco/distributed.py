"""torchrun-style data parallelism: process group from the environment, gradient averaging.

`python train.py` runs one process; `torchrun --nproc_per_node=N train.py` sets RANK,
WORLD_SIZE and LOCAL_RANK, and the same code then averages gradients across N processes.
Gradients are averaged explicitly after backward rather than through DDP's forward hook,
because a ToCo step runs the encoder several times (main view, second view, local crops) and
decides lazily which passes are needed; DDP requires a single forward call per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group described by torchrun's variables (no-op without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, world, local_rank)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # gloo can crash on exit if a rank leaves while others still talk
        dist.destroy_process_group()


def broadcast_parameters(module: nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not info.enabled:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """All-reduce (mean) the gradients of `params`, in one flat buffer per dtype.

    A parameter that has no gradient on any rank keeps `grad = None` (so AdamW still skips
    it, exactly as in a single process); one that has a gradient on some rank only gets zeros
    elsewhere before averaging.
    """
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    has_grad = torch.tensor(
        [p.grad is not None for p in params], dtype=torch.float32, device=params[0].device
    )
    dist.all_reduce(has_grad)
    live = [p for p, flag in zip(params, has_grad.tolist()) if flag > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat.div_(info.world_size)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def all_gather_cat(tensor: Tensor, info: DistInfo) -> Tensor:
    """Concatenate a tensor from every rank along dim 0 (no gradient)."""
    if not info.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
