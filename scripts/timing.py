"""How every benchmark script times and names the machine: one helper for all of them.

- `timed(fn, device, calls)`: wall seconds per call of `fn` (the GPU synchronised around it);
- `time_interleaved(steps, ...)`: several step functions timed in turn, so that a change in
  the machine's load hits them all alike; wall and process-CPU seconds per call;
- `machine_line()`: the CPU, cores, GPU, torch version, threads and load average, for tables.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def sync(device: Optional[torch.device]) -> None:
    """Wait for the GPU's queued work (nothing on the CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: Optional[torch.device] = None, calls: int = 1) -> float:
    """Wall seconds per call of `fn`, over `calls` consecutive calls."""
    sync(device)
    tic = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - tic) / calls


def time_interleaved(
    steps: dict[str, Callable[[int], object]],
    calls: int,
    rounds: int = 1,
    warmup: int = 0,
    device: Optional[torch.device] = None,
    block: int = 1,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each step function, the functions interleaved.

    Each round makes `calls` calls of every function, in turns of `block` consecutive calls per
    function (block 1: step by step); a turn's time divided by its calls is one measurement.
    A function gets its running call index (across rounds). The turns that start in the first
    `warmup` calls of a round are run but not recorded.
    """
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    done = {name: 0 for name in steps}
    for _ in range(rounds):
        for start in range(0, calls, block):
            n = min(block, calls - start)
            for name, step in steps.items():
                sync(device)
                tic, cpu_tic = time.perf_counter(), time.process_time()
                for _ in range(n):
                    step(done[name])
                    done[name] += 1
                sync(device)
                if start >= warmup:
                    wall[name].append((time.perf_counter() - tic) / n)
                    cpu[name].append((time.process_time() - cpu_tic) / n)
    return wall, cpu


def machine_line() -> str:
    """One line naming the machine a table was measured on."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"machine: {cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load}"
    )
