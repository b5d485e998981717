"""Where a training step spends its time: named, nestable stage timers and a ViT-pass counter.

Both cost nothing unless switched on (scripts/benchmark.py does), so the engine keeps them in
its hot path.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch
from torch import nn


class StageTimer:
    """Exclusive wall time per stage: a stage nested in another is not counted twice.

    On a GPU each boundary synchronises the device, so the times are real (and the step is a
    little slower while timing).
    """

    def __init__(self, enabled: bool = False, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, time spent in children]

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._sync()
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.totals[name] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def __call__(self, name: str):
        return self._timed(name) if self.enabled else contextlib.nullcontext()

    def reset(self) -> dict[str, float]:
        """The totals so far (seconds), then start again."""
        out = dict(self.totals)
        self.totals.clear()
        return out


class PassCounter:
    """Counts forward passes of a module and the images they carried (first input's batch)."""

    def __init__(self, module: nn.Module) -> None:
        self.passes = 0
        self.images = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.passes += 1
        self.images += int(args[0].shape[0]) if args and torch.is_tensor(args[0]) else 0

    def reset(self) -> tuple[int, int]:
        out = (self.passes, self.images)
        self.passes = self.images = 0
        return out

    def remove(self) -> None:
        self._handle.remove()
