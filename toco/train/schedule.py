"""Learning-rate schedule of the reference PolyWarmupAdamW (S1.5 in docs/fidelity.md)."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def poly_warmup_factor(
    step: int,
    warmup_iters: int,
    max_iters: int,
    warmup_ratio: float = 1e-6,
    power: float = 0.9,
) -> float:
    """LR multiplier used by optimizer step t (0-based).

    t < warmup: 1 - (1 - t / warmup) (1 - ratio), linear from `ratio` to ~1;
    t < max: (1 - t / max)^power, NOT shifted by the warm-up, so the LR drops at t = warmup;
    otherwise 0.
    """
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    if step < max_iters:
        return (1.0 - step / max_iters) ** power
    return 0.0


def build_poly_warmup_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_iters: int,
    max_iters: int,
    warmup_ratio: float = 1e-6,
    power: float = 0.9,
) -> LambdaLR:
    """LambdaLR with poly_warmup_factor; call scheduler.step() after every optimizer.step().

    LambdaLR's counter starts at 0, so optimizer step t runs with base_lr * factor(t), as the
    reference optimizer does. Per-group base LRs (x1, x10) are kept.
    """
    if max_iters < 1 or warmup_iters < 0:
        raise ValueError(
            f"need max_iters >= 1 and warmup_iters >= 0, got {max_iters}, {warmup_iters}"
        )

    def factor(step: int) -> float:
        return poly_warmup_factor(step, warmup_iters, max_iters, warmup_ratio, power)

    return LambdaLR(optimizer, lr_lambda=factor)
