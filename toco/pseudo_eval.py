"""Quality of the online pseudo labels: the training-time rule applied to labelled images.

Each image is resized to a size x size square (ToCo's in-training protocol), its multi-scale
CAMs (the training `cam_scales`, with flips) are thresholded with the training thresholds and the
ground-truth image labels, refined with PAR exactly as in a training step, resized back to the
mask and scored. Pixels the rule leaves uncertain (255) count as background, so an uncertain
foreground pixel is a miss; `coverage` reports the fraction of scored pixels that got a label.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F

from models.network import ToCoNet
from toco.cam import cam_to_label, multi_scale_cam, refine_cams_with_bkg
from toco.config import TrainConfig
from toco.distributed import DistInfo
from toco.metrics import ConfusionMatrix
from toco.par import PAR


@torch.no_grad()
def evaluate_pseudo_labels(model: ToCoNet, loader: Iterable[dict], num_classes: int,
                           device: torch.device, cfg: TrainConfig, size: int,
                           dist_info: DistInfo = DistInfo(), autocast=contextlib.nullcontext
                           ) -> tuple[ConfusionMatrix, float]:
    """(confusion matrix of the PAR-refined pseudo labels vs the masks, coverage in [0, 1]).

    Uses the final-layer CAMs (ToCo's source after `aux_cam_until_iter`). Batches of one image.
    """
    was_training = model.training
    model.eval()
    par = PAR(cfg.par_iters, cfg.par_dilations).to(device)
    result = ConfusionMatrix(num_classes, device=device)
    labelled = torch.zeros((), dtype=torch.float64, device=device)
    scored = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        image = batch["image"].to(device).float().div_(255)
        mask = batch["mask"].to(device)
        cls_label = batch["cls_label"].to(device).float()
        x = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        box = torch.tensor([[0, size, 0, size]], device=device).expand(x.shape[0], 4)
        with autocast():
            cam, _ = multi_scale_cam(model.cams, x, cfg.cam_scales)
        valid_cam, _ = cam_to_label(cam.float(), cls_label, box, cfg.bkg_thre, cfg.high_thre,
                                    cfg.low_thre, ignore_mid=True)
        label = refine_cams_with_bkg(par, x, valid_cam, cls_label, box, cfg.high_thre,
                                     cfg.low_thre, cfg.refine_down_scale)
        label = F.interpolate(label[:, None].float(), size=mask.shape[-2:],
                              mode="nearest")[:, 0].long()
        known = mask != 255
        labelled += ((label != 255) & known).sum()
        scored += known.sum()
        result.update(label.masked_fill(label == 255, 0), mask)
    if dist_info.enabled:
        result.all_reduce_()
        pair = torch.stack([labelled, scored])
        torch.distributed.all_reduce(pair)
        labelled, scored = pair[0], pair[1]
    model.train(was_training)
    return result, float(labelled / scored.clamp_min(1))
