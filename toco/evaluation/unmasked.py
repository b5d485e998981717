"""Validation of a held-back set without masks (a tagged collection): what tags can measure.

Image level: mAP and F1 (at 0.5 on the sigmoid) of the CAM classifier's logits against the
image tags. Pixel level: the coverage of the pseudo labels the training rule gives each image
(toco.evaluation.pseudo: multi-scale CAM, thresholds with the tags, PAR): the share of pixels
it decides (not 255) and the foreground share. The run's preview.png shows the same images.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from models.network import ToCoNet
from toco.config import TrainConfig
from toco.distributed import DistInfo
from toco.evaluation.pseudo import IGNORE, pseudo_labels
from toco.method.multilabel import multilabel_scores
from toco.method.par import PAR

CLASSIFICATION_THRESHOLD = 0.5


@torch.no_grad()
def validate_without_masks(
    model: ToCoNet,
    loader: Iterable[dict],
    cfg: TrainConfig,
    device: torch.device,
    size: int,
    use_aux_cam: bool = False,
    dist_info: DistInfo = DistInfo(),
    autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Scores of the loader's images, summed over ranks (percent; ``images``: how many).

    The classifier sees each image resized to size x size (as ``engine.validate``); the
    pseudo labels are made at that size and scored at the image's own.
    """
    par = PAR(cfg.par_iters, cfg.par_dilations).to(device)
    model.eval()
    probs, tags = [], []
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # pixels, decided, foreground
    for batch in loader:
        image = batch["image"].to(device).float().div_(255)
        cls_label = batch["cls_label"].to(device).float()
        with autocast():
            resized = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
            logits, _ = model.classify(model.encode(resized))
            pseudo = pseudo_labels(
                model, image, cls_label, cfg, par, size=size, use_aux_cam=use_aux_cam
            )
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        tags.append(cls_label.cpu().numpy())
        decided = pseudo != IGNORE
        counts += torch.stack(
            [
                torch.tensor(pseudo.numel(), device=device),
                decided.sum(),
                (decided & (pseudo > 0)).sum(),
            ]
        ).double()
    scores, targets = _gathered(probs, tags, dist_info)
    if dist_info.enabled:
        torch.distributed.all_reduce(counts)
    model.train()
    metrics = {
        f"cls_{k}": v
        for k, v in multilabel_scores(scores, targets, CLASSIFICATION_THRESHOLD).items()
    }
    pixels, decided, foreground = counts.tolist()
    metrics["pseudo_coverage"] = decided / pixels * 100 if pixels else float("nan")
    metrics["pseudo_foreground"] = foreground / pixels * 100 if pixels else float("nan")
    metrics["images"] = int(len(scores))
    return metrics


def _gathered(
    probs: list[np.ndarray], tags: list[np.ndarray], dist_info: DistInfo
) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) probabilities and tags of every rank."""
    mine = (np.concatenate(probs), np.concatenate(tags)) if probs else None
    if not dist_info.enabled:
        if mine is None:
            raise ValueError("validation without masks got no image")
        return mine
    parts: list = [None] * dist_info.world_size
    torch.distributed.all_gather_object(parts, mine)
    parts = [p for p in parts if p is not None]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def format_scores(metrics: dict[str, float]) -> str:
    """The scores as a short two-column table."""
    rows = [
        ("images", f"{metrics['images']}"),
        ("classification mAP", f"{metrics['cls_map']:.2f}"),
        ("classification F1 (macro, at 0.5)", f"{metrics['cls_f1']:.2f}"),
        ("classification F1 (micro, at 0.5)", f"{metrics['cls_f1_micro']:.2f}"),
        ("pseudo-label coverage (% not 255)", f"{metrics['pseudo_coverage']:.2f}"),
        ("pseudo-label foreground (% of pixels)", f"{metrics['pseudo_foreground']:.2f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>7}" for name, value in rows)
