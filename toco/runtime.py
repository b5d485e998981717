"""Where and how a process computes: the device, the autocast dtype, CPU threads and TF32.

Shared by training, evaluation and prediction (none of which import each other for it).
"""

from __future__ import annotations

import os
from typing import Optional, Protocol

import torch
from torch import Tensor

from toco.errors import ConfigError


class RuntimeSettings(Protocol):
    """The settings this module reads (a TrainConfig has them)."""

    threads: Optional[int]
    num_workers: int
    tf32: bool


def resolve_device(name: str) -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N', checked against the devices this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name} requested but no CUDA device is available")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"--device {name}: this machine has {count} CUDA device(s), "
                f"cuda:0..cuda:{count - 1}"
            )
    return device


def resolve_amp(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for --amp (None = fp32, the official precision). 'auto': bf16 on
    GPUs that support it (opt-in: not shown to leave the published results unchanged)."""
    if mode == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this job on this machine, from the launcher's variables (1 without)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))


def cpu_threads(
    cfg: RuntimeSettings, device: torch.device, local_world_size: int | None = None
) -> tuple[int, str]:
    """Torch threads for this process, and why.

    On the CPU, torch's OpenMP threads spin-wait for each other: any other busy process on
    their cores (a data-loader worker, another rank) can make a step many times slower. So by
    default the threads and the data-loader workers of all local processes together never
    exceed the cores: threads = cores / processes - workers, at least 1.
    """
    if cfg.threads:
        return cfg.threads, "set by --threads"
    if "OMP_NUM_THREADS" in os.environ:  # torchrun sets 1; a user's choice also wins
        return torch.get_num_threads(), "OMP_NUM_THREADS; --threads overrides"
    if device.type != "cpu":
        return torch.get_num_threads(), "torch's default on a GPU run; --threads overrides"
    cores = available_cores()
    if local_world_size is None:
        local_world_size = local_processes()
    threads = max(1, cores // max(local_world_size, 1) - cfg.num_workers)
    return threads, (
        f"{cores} cores, {local_world_size} process(es), {cfg.num_workers} "
        "data-loader worker(s) each; --threads overrides"
    )


def configure_precision(
    cfg: RuntimeSettings, device: torch.device, local_world_size: int | None = None
) -> str:
    """Threads, denormals and TF32; returns a line for the log saying what was chosen."""
    threads, why = cpu_threads(cfg, device, local_world_size)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    # Denormal values (tiny activations and optimizer moments) make CPU maths up to 20x slower.
    torch.set_flush_denormal(True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    return f"{threads} CPU thread(s) ({why})"


def full_precision(x: Tensor) -> torch.autocast:
    """Context that keeps the maths in the inputs' (>= fp32) precision under autocast:
    similarities divided by a small temperature, k-means distances and the loss formulas would
    lose their last digits in bf16."""
    return torch.autocast(device_type=x.device.type, enabled=False)
