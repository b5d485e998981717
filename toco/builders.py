"""Build the model and pick the device from a config (shared by train.py and evaluate.py)."""
from __future__ import annotations

import torch

from models.backbone import ViTBackbone
from models.network import ToCoNet
from toco.config import TrainConfig
from toco.errors import ConfigError


def build_model(cfg: TrainConfig, num_classes: int, pretrained: str | None = None) -> ToCoNet:
    """ToCoNet for `num_classes` (background included), with the enabled plug-ins' parts;
    `pretrained` overrides cfg.pretrained."""
    kwargs = {"depth": cfg.backbone_depth} if cfg.backbone_depth else {}
    backbone = ViTBackbone(cfg.backbone, cfg.pretrained if pretrained is None else pretrained,
                           aux_layer=cfg.aux_layer, **kwargs)
    model = ToCoNet(backbone, num_classes, decoder_dim=cfg.decoder_dim,
                    ema_momentum=cfg.ema_momentum)
    # Plug-in feature hooks (RCA's aggregation) are part of the network: training, the CAM
    # passes, evaluation and export all rebuild them from the config. None when plug-ins are off.
    from toco.plugins import attach_plugins

    attach_plugins(model, cfg, num_classes)
    return model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    return torch.device(name)
