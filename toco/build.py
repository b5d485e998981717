"""What a TrainConfig builds: the model (with the enabled plug-ins' parts) and the datasets.

The one place where config fields meet the network and dataset constructors; shared by training,
evaluation, export and the benchmarks.
"""

from __future__ import annotations

from typing import Any

import datasets
from datasets import DatasetSpec, VOCEvalDataset, VOCTrainDataset
from datasets.voc import seed_worker
from models.backbone import IMAGENET_MEAN, IMAGENET_STD, ViTBackbone
from models.network import ToCoNet
from toco.config import TrainConfig
from toco.method.energy import RegularizationLoss
from toco.method.losses import (
    ClassificationLoss,
    ClassTokenContrast,
    PatchTokenContrast,
    SegmentationLoss,
)
from toco.method.step import LossModule

__all__ = [
    "build_model",
    "build_loss_modules",
    "input_normalisation",
    "compile_backbone",
    "dataset_spec",
    "train_dataset",
    "eval_dataset",
    "layout_params",
    "seed_worker",
]


def build_model(cfg: TrainConfig, num_classes: int, pretrained: str | None = None) -> ToCoNet:
    """ToCoNet for `num_classes` (background included), with the enabled plug-ins' parts;
    `pretrained` overrides cfg.pretrained."""
    kwargs = {"depth": cfg.backbone_depth} if cfg.backbone_depth else {}
    trainable_blocks = 0 if cfg.freeze_backbone else cfg.trainable_blocks
    backbone = ViTBackbone(
        cfg.backbone,
        cfg.pretrained if pretrained is None else pretrained,
        aux_layer=cfg.aux_layer,
        pos_embed_antialias=cfg.pos_embed_antialias,
        trainable_blocks=trainable_blocks,
        **kwargs,
    )
    mean, std = input_normalisation(cfg, backbone)
    model = ToCoNet(
        backbone,
        num_classes,
        decoder_dim=cfg.decoder_dim,
        ema_momentum=cfg.ema_momentum,
        ctc_hidden_dim=cfg.ctc_hidden_dim,
        ctc_out_dim=cfg.ctc_out_dim,
        pixel_mean=mean,
        pixel_std=std,
    )
    backbone.grad_checkpointing = cfg.grad_checkpointing
    # Plug-in feature hooks (RCA's aggregation) are part of the network: training, the CAM
    # passes, evaluation and export all rebuild them from the config. None when plug-ins are off.
    from toco.plugins import attach_plugins

    attach_plugins(model, cfg, num_classes)
    return model


def build_loss_modules(cfg: TrainConfig) -> list[LossModule]:
    """ToCo's loss terms with their weights and switch-on iterations from the config."""
    return [
        ClassificationLoss(cfg.w_cls),
        PatchTokenContrast(cfg.w_ptc, cfg.contrast_start_iter, cfg.loss_group_size),
        ClassTokenContrast(
            cfg.w_ctc,
            cfg.contrast_start_iter,
            temperature=cfg.ctc_temp,
            always_add_negative_term=cfg.ctc_negative_term,
        ),
        SegmentationLoss(cfg.w_seg, cfg.seg_start_iter, cfg.loss_group_size),
        RegularizationLoss(
            cfg.w_reg, cfg.seg_start_iter, reference_gradient=cfg.reg_gradient == "reference"
        ),
    ]


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


# ---- datasets ----------------------------------------------------------------------------------
def layout_params(cfg: TrainConfig) -> dict[str, Any]:
    """What the dataset's layout is built with: the generated set's size, or a tagged root's
    held-back fraction."""
    if cfg.dataset == "tags":
        return {"val_fraction": cfg.val_fraction}
    return {"num_train": cfg.synthetic_train, "num_val": cfg.synthetic_val, "seed": 0}


def dataset_spec(cfg: TrainConfig) -> DatasetSpec:
    """The dataset's spec; a tagged root's class names are read from cfg.data_root."""
    return datasets.get_dataset_spec(cfg.dataset, cfg.data_root)


def train_dataset(cfg: TrainConfig) -> VOCTrainDataset:
    return datasets.build_train_dataset(
        cfg.dataset,
        cfg.data_root,
        cfg.train_split,
        cfg.crop_size,
        cfg.cache_dir,
        scale_range=tuple(cfg.scale_range),
        align_local_flip=cfg.local_view_flip == "aligned",  # "independent": reference bug B2
        skip_bad_images=cfg.skip_bad_images,
        synthetic_params=layout_params(cfg),
        label_source=cfg.image_labels,
    )


def eval_dataset(
    cfg: TrainConfig, split: str | None, with_masks: bool | None = True
) -> VOCEvalDataset:
    """with_masks=None: masks where the split has them (see datasets.build_eval_dataset)."""
    return datasets.build_eval_dataset(
        cfg.dataset,
        cfg.data_root,
        split,
        cfg.cache_dir,
        with_masks=with_masks,
        synthetic_params=layout_params(cfg),
        label_source=cfg.image_labels,
    )
