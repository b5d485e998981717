"""Quality of the online pseudo labels on labelled images, as the ablation command reports it.

Each image is resized to a size x size square (ToCo's in-training protocol) and labelled by the
training rule (toco.evaluation.pseudo.pseudo_labels, final-layer CAMs), then scored at the
mask's resolution. Here pixels the rule leaves uncertain (255) count as background, so an
uncertain foreground pixel is a miss; `coverage` reports the fraction of scored pixels that got
a label. (`evaluate.py --mode pseudo` leaves uncertain pixels out instead, as ToCo's tool does.)
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from models.network import ToCoNet
from toco.config import TrainConfig
from toco.distributed import DistInfo
from toco.evaluation.pseudo import IGNORE, PseudoLabelScores, pseudo_labels
from toco.method.metrics import ConfusionMatrix
from toco.method.par import PAR


@torch.no_grad()
def evaluate_pseudo_labels(model: ToCoNet, loader: Iterable[dict], num_classes: int,
                           device: torch.device, cfg: TrainConfig, size: int,
                           dist_info: DistInfo = DistInfo(), autocast=contextlib.nullcontext
                           ) -> tuple[ConfusionMatrix, float]:
    """(confusion matrix of the PAR-refined pseudo labels vs the masks, coverage in [0, 1])."""
    was_training = model.training
    model.eval()
    par = PAR(cfg.par_iters, cfg.par_dilations).to(device)
    result = ConfusionMatrix(num_classes, device=device)
    scores = PseudoLabelScores(num_classes, device)
    for batch in loader:
        image = batch["image"].to(device).float().div_(255)
        mask = batch["mask"].to(device)
        cls_label = batch["cls_label"].to(device).float()
        with autocast():
            label = pseudo_labels(model, image, cls_label, cfg, par, size=size,
                                  use_aux_cam=False)
        scores.update(label, mask)
        result.update(label.masked_fill(label == IGNORE, 0), mask)
    if dist_info.enabled:
        result.all_reduce_()
        scores.all_reduce_()
    model.train(was_training)
    coverage = scores.coverage
    return result, 0.0 if coverage != coverage else coverage
