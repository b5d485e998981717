"""Refined pseudo labels for any image, by the training rule, and their scores.

The rule of a training step (multi-scale CAM with flips at the training `cam_scales`, the
high/low thresholds with the image-level labels, PAR refinement of the two background stacks
at 1/`refine_down_scale` resolution, the h/l combination) is applied to the whole image at the
protocol's size (448 x 448 for train-val and coco-ms, the original size for voc-ms); the label
is then brought back to the original size by nearest neighbour. 255 marks pixels the rule
leaves uncertain. The CAM source follows training too: the aux CAM for checkpoints taken before
`aux_cam_until_iter`, the final-layer CAM after.

With a CRF, each PAR-refined stack is further refined by the dense CRF of ToCo's pseudo-label
tool before its argmax.

`evaluate_pseudo_labels` scores the rule over a labelled loader, as the ablation reports it:
each image at a size x size square (ToCo's in-training protocol), final-layer CAMs, scored
at the mask's resolution. There pixels the rule leaves uncertain count as background, so an
uncertain foreground pixel is a miss, and `coverage` is the fraction of scored pixels that got
a label (`evaluate.py --mode pseudo` leaves uncertain pixels out instead, as ToCo's tool does).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from models.network import ToCoNet
from toco.config import TrainConfig
from toco.distributed import DistInfo
from toco.method.cam import cam_to_label, refine_cams_with_bkg
from toco.method.inference import predict_cams
from toco.method.metrics import ConfusionMatrix
from toco.method.par import PAR

IGNORE = 255
Refiner = Callable[[Tensor, Tensor], Tensor]  # (uint8 image (1,3,H,W), probs) -> probs


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def refine_with_crf(
    par: PAR,
    images: Tensor,
    valid_cam: Tensor,
    cls_label: Tensor,
    high_thre: float,
    low_thre: float,
    down_scale: int,
    crf: Refiner,
) -> Tensor:
    """The training refinement (toco.method.cam.refine_cams_with_bkg, whole image, no box) with
    `crf` applied to each PAR-refined stack before its argmax; one image at a time.

    With an identity `crf` this equals refine_cams_with_bkg (tested).
    """
    b, _, h, w = images.shape
    small = _resize(images.float(), (h // down_scale, w // down_scale))
    image_u8 = (images * 255).round().clamp(0, 255).to(torch.uint8)
    out = []
    for i in range(b):
        keys = torch.cat(
            [
                cls_label.new_zeros(1, dtype=torch.long),
                torch.nonzero(cls_label[i] > 0).flatten() + 1,
            ]
        )
        fg = valid_cam[i : i + 1, keys[1:] - 1].float()
        labels = []
        for thre in (high_thre, low_thre):
            stack = torch.cat([fg.new_full((1, 1, h, w), thre), fg], dim=1)
            probs = _resize(stack, small.shape[-2:]).softmax(dim=1)
            refined = _resize(par(small[i : i + 1], probs), (h, w))
            refined = refined / refined.sum(dim=1, keepdim=True).clamp_min(1e-12)
            labels.append(keys[crf(image_u8[i : i + 1], refined).argmax(dim=1)])
        label_h, label_l = labels
        ignore = torch.full_like(label_h, IGNORE)
        out.append(torch.where(label_h == 0, torch.where(label_l == 0, label_h, ignore), label_h))
    return torch.cat(out)


@torch.no_grad()
def pseudo_labels(
    model: ToCoNet,
    image: Tensor,
    cls_label: Tensor,
    cfg: TrainConfig,
    par: PAR,
    *,
    size: Optional[int],
    use_aux_cam: bool,
    cam_scales: Optional[tuple[float, ...]] = None,
    patch_fit: str = "pad",
    crf: Optional[Refiner] = None,
) -> Tensor:
    """(B, H, W) long pseudo labels at the image's size (0..C-1, 255 = uncertain).

    image: (B, 3, H, W) in [0, 1]; cls_label: (B, C-1) image-level labels.
    """
    out_size = image.shape[-2:]
    x = _resize(image, (size, size)) if size and tuple(out_size) != (size, size) else image
    cam, cam_aux = predict_cams(
        model, x, cam_scales or cfg.cam_scales, flip=True, patch_fit=patch_fit
    )
    source = (cam_aux if use_aux_cam else cam).float()
    box = torch.tensor([[0, x.shape[-2], 0, x.shape[-1]]], device=x.device).expand(x.shape[0], 4)
    valid_cam, _ = cam_to_label(
        source, cls_label, box, cfg.bkg_thre, cfg.high_thre, cfg.low_thre, ignore_mid=True
    )
    if crf is None:
        label = refine_cams_with_bkg(
            par, x, valid_cam, cls_label, box, cfg.high_thre, cfg.low_thre, cfg.refine_down_scale
        )
    else:
        label = refine_with_crf(
            par, x, valid_cam, cls_label, cfg.high_thre, cfg.low_thre, cfg.refine_down_scale, crf
        )
    if tuple(label.shape[-2:]) != tuple(out_size):
        label = F.interpolate(label[:, None].float(), size=out_size, mode="nearest")[:, 0]
    return label.long()


class PseudoLabelScores:
    """Scores of labels that may hold 255 (uncertain), against ground-truth masks.

    `ignored`: uncertain pixels are left out, as ToCo's `pseudo_scores` (the main number);
    `strict`: an uncertain pixel counts as a miss of its ground-truth class;
    coverage: labelled pixels / pixels with ground truth (both counts summed over processes).
    """

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.ignored = ConfusionMatrix(num_classes, device=device)
        self.strict = ConfusionMatrix(num_classes, device=device)
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)  # labelled, scored

    def update(self, label: Tensor, mask: Tensor) -> None:
        uncertain = label == IGNORE
        self.ignored.update(label.masked_fill(uncertain, 0), mask.masked_fill(uncertain, IGNORE))
        self.strict.update(label, mask)
        known = (mask >= 0) & (mask < self.ignored.num_classes)
        self.counts += torch.stack([(known & ~uncertain).sum(), known.sum()]).to(self.counts)

    def all_reduce_(self) -> "PseudoLabelScores":
        import torch.distributed as dist

        self.ignored.all_reduce_()
        self.strict.all_reduce_()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)
        return self

    @property
    def coverage(self) -> float:
        labelled, scored = self.counts.tolist()
        return labelled / scored if scored else float("nan")


@torch.no_grad()
def evaluate_pseudo_labels(
    model: ToCoNet,
    loader: Iterable[dict],
    num_classes: int,
    device: torch.device,
    cfg: TrainConfig,
    size: int,
    dist_info: DistInfo = DistInfo(),
    autocast=contextlib.nullcontext,
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
            label = pseudo_labels(model, image, cls_label, cfg, par, size=size, use_aux_cam=False)
        scores.update(label, mask)
        result.update(label.masked_fill(label == IGNORE, 0), mask)
    if dist_info.enabled:
        result.all_reduce_()
        scores.all_reduce_()
    model.train(was_training)
    coverage = scores.coverage
    return result, 0.0 if coverage != coverage else coverage
