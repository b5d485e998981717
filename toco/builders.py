"""Build the model and pick the device from a config (shared by train.py and evaluate.py)."""
from __future__ import annotations

from models.backbone import IMAGENET_MEAN, IMAGENET_STD, ViTBackbone
from models.network import ToCoNet
from toco.config import TrainConfig


def build_model(cfg: TrainConfig, num_classes: int, pretrained: str | None = None) -> ToCoNet:
    """ToCoNet for `num_classes` (background included), with the enabled plug-ins' parts;
    `pretrained` overrides cfg.pretrained."""
    kwargs = {"depth": cfg.backbone_depth} if cfg.backbone_depth else {}
    trainable_blocks = 0 if cfg.freeze_backbone else cfg.trainable_blocks
    backbone = ViTBackbone(cfg.backbone, cfg.pretrained if pretrained is None else pretrained,
                           aux_layer=cfg.aux_layer, pos_embed_antialias=cfg.pos_embed_antialias,
                           trainable_blocks=trainable_blocks, **kwargs)
    mean, std = input_normalisation(cfg, backbone)
    model = ToCoNet(backbone, num_classes, decoder_dim=cfg.decoder_dim,
                    ema_momentum=cfg.ema_momentum, ctc_hidden_dim=cfg.ctc_hidden_dim,
                    ctc_out_dim=cfg.ctc_out_dim, pixel_mean=mean, pixel_std=std)
    backbone.grad_checkpointing = cfg.grad_checkpointing
    # Plug-in feature hooks (RCA's aggregation) are part of the network: training, the CAM
    # passes, evaluation and export all rebuild them from the config. None when plug-ins are off.
    from toco.plugins import attach_plugins

    attach_plugins(model, cfg, num_classes)
    return model


def input_normalisation(cfg: TrainConfig, backbone: ViTBackbone) -> tuple[tuple, tuple]:
    """(mean, std) of the input: ImageNet's, or those the backbone was pretrained with."""
    if cfg.input_norm == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return backbone.pretrained_mean, backbone.pretrained_std



def compile_backbone(model: ToCoNet, mode: str, backend: str = "inductor") -> None:
    """torch.compile each transformer block in place (state-dict keys are unchanged).

    Blocks rather than the whole network: ToCo feeds the encoder five input sizes per step
    (crop, CAM scales, local crops), and `dynamic=True` lets one graph serve all token counts.
    """
    if mode == "none":
        return
    for block in model.backbone.vit.blocks:
        block.compile(mode=None if mode == "default" else mode, dynamic=True, backend=backend)
