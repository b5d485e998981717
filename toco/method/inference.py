"""Prediction for evaluation: segmentation logits and CAMs for one image (or batch) at a time.

Inputs whose side is not a multiple of the patch size are handled in one of two ways
(`patch_fit`):
- "pad" (default, our fix of reference bug B12): zero-pad to the next multiple, run, upsample
  the token maps to the padded size and crop back, so no pixel is dropped or stretched;
- "floor" (the official tools): run on the largest multiple of the patch that fits (the
  patch convolution drops the remainder pixels) and stretch the token maps over the whole image.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from models.network import ToCoNet
from toco.method.cam import cam_to_label, multi_scale_cam

PATCH_FITS = ("pad", "floor")
FUSIONS = ("sum", "max")


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, C, H, W) to `size` (align_corners False); a no-op at that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def token_maps(
    fn: Callable, x: Tensor, multiple: int, patch_fit: str = "pad"
) -> tuple[Tensor, ...]:
    """Apply a token-stride map function `fn` to x of any size (see the module docstring).

    "pad" returns maps at x's size, or the raw token maps when x needs no padding; "floor"
    returns the raw token maps. The caller resizes raw maps to the size it wants with ONE
    bilinear resize, as the official tools do.
    """
    h, w = x.shape[-2:]
    if patch_fit == "floor":
        hf, wf = h - h % multiple, w - w % multiple
        if hf == 0 or wf == 0:
            raise ValueError(f"a {h}x{w} input is smaller than one {multiple}px patch")
        outs = fn(x[..., :hf, :wf])
        return outs if isinstance(outs, tuple) else (outs,)
    if patch_fit != "pad":
        raise ValueError(f"patch_fit must be one of {PATCH_FITS}, got {patch_fit!r}")
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not pad_h and not pad_w:
        # Nothing to pad: the raw maps, so that the caller's one resize is the official one
        # (resizing to x's size first adds an interpolation: up to 1.5e-2 on multi-scale CAMs).
        outs = fn(x)
        return outs if isinstance(outs, tuple) else (outs,)
    padded = F.pad(x, (0, pad_w, 0, pad_h))
    outs = fn(padded)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return tuple(
        F.interpolate(o, size=padded.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]
        for o in outs
    )


def _fuse(a: Tensor, b: Tensor, how: str) -> Tensor:
    if how == "sum":
        return a + b
    if how == "max":
        return torch.maximum(a, b)
    raise ValueError(f"fusion must be one of {FUSIONS}, got {how!r}")


def scaled(image: Tensor, s: float) -> Tensor:
    """Bilinear resize to (int(s H), int(s W)), the reference's rounding; s = 1 is a no-op."""
    if s == 1.0:
        return image
    h, w = image.shape[-2:]
    return resize(image, (max(1, int(h * s)), max(1, int(w * s))))


@torch.no_grad()
def predict_seg_logits(
    model: ToCoNet,
    image: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    size: Optional[int] = None,
    flip_fusion: str = "sum",
    scale_fusion: str = "max",
    patch_fit: str = "pad",
) -> Tensor:
    """Segmentation logits (B, C, H, W) at the input's size.

    `size` first resizes the input to a size x size square. For each scale the logits of the
    input and of its mirror image are upsampled to the input's size, the mirror's un-flipped,
    and the pair fused by `flip_fusion`; the scales are then fused by `scale_fusion`.
    ToCo's VOC tool: flip SUM, scales MAX; its COCO tool: flip MAX, scales SUM.
    """
    out_size = image.shape[-2:]
    base = resize(image, (size, size)) if size else image
    fused = None
    for s in scales:
        x = scaled(base, s)
        n = x.shape[0]
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        logits = resize(token_maps(model, batch, model.patch_size, patch_fit)[0], out_size)
        if flip:
            logits = _fuse(logits[:n], logits[n:].flip(-1), flip_fusion)
        fused = logits if fused is None else _fuse(fused, logits, scale_fusion)
    return fused


@torch.no_grad()
def predict_cams(
    model: ToCoNet,
    image: Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    flip: bool = True,
    size: Optional[int] = None,
    patch_fit: str = "pad",
) -> tuple[Tensor, Tensor]:
    """Multi-scale normalised (cam, cam_aux), each (B, C-1, H, W) at the input's size."""
    out_size = image.shape[-2:]
    x = resize(image, (size, size)) if size else image
    cam, cam_aux = multi_scale_cam(
        lambda t: token_maps(model.cams, t, model.patch_size, patch_fit), x, scales, flip=flip
    )
    return resize(cam, out_size), resize(cam_aux, out_size)


def class_score_map(cam: Tensor, cls_label: Tensor) -> Tensor:
    """(B, H, W): per pixel, the highest CAM score among each image's own classes (the map
    the heat-map pictures show). cam: (B, C-1, H, W); cls_label: (B, C-1)."""
    return (cam * cls_label[:, :, None, None]).amax(1)


def cams_to_prediction(cam: Tensor, cls_label: Tensor, bkg_thre: float) -> Tensor:
    """Label map from CAMs masked by the image labels: argmax+1, background where <= bkg_thre."""
    return cam_to_label(cam, cls_label, img_box=None, bkg_thre=bkg_thre)[1]
