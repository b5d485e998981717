"""The optimizer's parameter groups: ToCo's four, or per-layer backbone groups (layer decay).

ToCo (layer_decay 1): backbone non-norm, backbone norm (LR x1), classifiers + CTC head +
plug-ins, decoder (LR x head_lr_mult); weight decay on every group. With layer decay the
backbone is split by stage (embeddings, each block, final norm/pool; `ViTBackbone.stage_of`)
and stage s of a depth-L backbone gets lr x decay^(L+1-s), as in BEiT/DINOv2 fine-tuning.
Frozen parameters (--freeze-backbone, --trainable-blocks) are in no group.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from models.network import ToCoNet
from toco.config import TrainConfig


def layer_decay_scales(depth: int, decay: float) -> list[float]:
    """LR factor of each stage 0..depth+1: decay^(depth+1-stage)."""
    return [decay ** (depth + 1 - stage) for stage in range(depth + 2)]


def backbone_stage_groups(model: ToCoNet, lr: float, decay: float) -> list[dict[str, Any]]:
    """One group per backbone stage with trainable parameters, top stage first (so group 0
    carries the undecayed backbone LR whenever the final norm trains)."""
    backbone = model.backbone
    scales = layer_decay_scales(backbone.depth, decay)
    by_stage: dict[int, list[nn.Parameter]] = {}
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            by_stage.setdefault(backbone.stage_of(name), []).append(p)
    return [{"params": by_stage[s], "lr": lr * scales[s]} for s in sorted(by_stage, reverse=True)]


def build_param_groups(
    model: ToCoNet, cfg: TrainConfig, extra_params: Sequence[nn.Parameter] = ()
) -> list[dict[str, Any]]:
    """AdamW parameter groups; plug-in parameters (`extra_params`) join the heads."""
    groups = model.param_groups()
    heads = groups[2] + list(extra_params)
    decoder = groups[3]
    if cfg.layer_decay == 1.0:
        backbone = [{"params": g, "lr": cfg.lr} for g in groups[:2]]
    else:
        backbone = backbone_stage_groups(model, cfg.lr, cfg.layer_decay)
    head_lr = cfg.lr * cfg.head_lr_mult
    out = backbone + [{"params": heads, "lr": head_lr}, {"params": decoder, "lr": head_lr}]
    return [g for g in out if g["params"]]


def build_adamw(
    model: ToCoNet, cfg: TrainConfig, extra_params: Sequence[nn.Parameter] = ()
) -> torch.optim.AdamW:
    """AdamW over `build_param_groups` with the config's betas and weight decay (all groups)."""
    return torch.optim.AdamW(
        build_param_groups(model, cfg, extra_params),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=1e-8,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )
