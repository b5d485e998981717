"""Prediction for evaluation: segmentation and CAM labels for one image at a time.

Inputs of any size are zero-padded to a multiple of the patch size and the outputs cropped back,
so no remainder pixels are dropped and nothing is stretched (reference bug B12).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from models.network import ToCoNet
from toco.cam import cam_to_label, multi_scale_cam


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple))


def _run_padded(fn, x: Tensor, multiple: int) -> tuple[Tensor, ...]:
    """Apply a token-stride map function to padded x; return maps at x's size."""
    h, w = x.shape[-2:]
    padded = _pad_to_multiple(x, multiple)
    outs = fn(padded)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return tuple(F.interpolate(o, size=padded.shape[-2:], mode="bilinear",
                               align_corners=False)[..., :h, :w] for o in outs)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_seg_logits(model: ToCoNet, image: Tensor, scales: Sequence[float] = (1.0,),
                       flip: bool = False, size: Optional[int] = None) -> Tensor:
    """Segmentation logits (B, C, H, W) at the input's size.

    `size` first resizes the input to a size x size square (ToCo's in-training protocol).
    Per scale the flip pair is fused by SUM, scales by element-wise MAX (ToCo's VOC tool).
    """
    out_size = image.shape[-2:]
    base = _resize(image, (size, size)) if size else image
    fused = None
    for s in scales:
        x = base if s == 1.0 else _resize(
            base, (max(1, int(base.shape[-2] * s)), max(1, int(base.shape[-1] * s))))
        if flip:
            logits = _run_padded(model, torch.cat([x, x.flip(-1)]), model.patch_size)[0]
            logits = _resize(logits, out_size)
            n = x.shape[0]
            logits = logits[:n] + logits[n:].flip(-1)
        else:
            logits = _resize(_run_padded(model, x, model.patch_size)[0], out_size)
        fused = logits if fused is None else torch.maximum(fused, logits)
    return fused


@torch.no_grad()
def predict_cams(model: ToCoNet, image: Tensor, scales: Sequence[float] = (1.0, 0.5, 1.5),
                 flip: bool = True, size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Multi-scale normalised (cam, cam_aux), each (B, C-1, H, W) at the input's size."""
    out_size = image.shape[-2:]
    x = _resize(image, (size, size)) if size else image
    cam, cam_aux = multi_scale_cam(lambda t: _run_padded(model.cams, t, model.patch_size), x,
                                   scales, flip=flip)
    return _resize(cam, out_size), _resize(cam_aux, out_size)


def cams_to_prediction(cam: Tensor, cls_label: Tensor, bkg_thre: float) -> Tensor:
    """Label map from CAMs masked by the image labels: argmax+1, background where <= bkg_thre."""
    return cam_to_label(cam, cls_label, img_box=None, bkg_thre=bkg_thre)[1]
