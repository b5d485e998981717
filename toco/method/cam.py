"""Online pseudo labels from CAMs (S2.1-S2.3, S2.5 in docs/fidelity.md).

Shapes: B images, C classes including background, so CAMs carry C-1 foreground channels.
Image boxes img_box are rows [y0, y1, x0, x1] in pixels, end exclusive: the part of a padded crop
that holds real image pixels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from toco.method.par import PAR

CamFn = Callable[[Tensor], tuple[Tensor, Tensor]]


def _float(x: Tensor) -> Tensor:
    """x in at least fp32 (CAM maths under autocast would otherwise run in bf16/fp16)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@torch.no_grad()
def multi_scale_cam(
    cam_fn: CamFn,
    images: Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    flip: bool = True,
    given: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Multi-scale, flip-max CAMs, min-max normalised per (image, class) (S2.1).

    cam_fn(x) returns the raw (cam, cam_aux), each (N, C-1, h, w). For each scale s (1.0 first,
    always): x_s = bilinear resize of images to (int(s H), int(s W)); both maps of cam_fn on
    [x_s; flip(x_s)] are upsampled to (H, W), then max(original, un-flipped), then ReLU. The sum
    over scales is normalised: cam <- cam - min; cam <- cam / (max + 1e-5).

    given: the raw maps cam_fn(images) when the caller already has them (the training step's
    own pass over the same images, detached); then scale 1.0 only runs the flipped copy.

    Returns (cam, cam_aux), each (B, C-1, H, W) with values in [0, 1).
    """
    b, _, h, w = images.shape
    ordered = [1.0] + [float(s) for s in scales if float(s) != 1.0]
    totals: list[Tensor] | None = None
    for s in ordered:
        if s == 1.0:
            x = images
        else:
            size = (int(s * h), int(s * w))
            if min(size) < 1:
                raise ValueError(f"CAM scale {s} turns a {h}x{w} image into an empty {size} one")
            x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if s == 1.0 and given is not None:
            raw = (
                given
                if not flip
                else [torch.cat([g, f]) for g, f in zip(given, cam_fn(x.flip(-1)))]
            )
        else:
            raw = cam_fn(torch.cat([x, x.flip(-1)], dim=0) if flip else x)
        maps = []
        for m in raw:
            # Upsample BEFORE the flip-max, as the reference does.
            m = F.interpolate(_float(m), size=(h, w), mode="bilinear", align_corners=False)
            if flip:
                m = torch.maximum(m[:b], m[b:].flip(-1))
            maps.append(F.relu(m))
        totals = maps if totals is None else [t + m for t, m in zip(totals, maps)]
    assert totals is not None
    out = []
    for cam in totals:
        cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
        out.append(cam / (cam.amax(dim=(-2, -1), keepdim=True) + 1e-5))
    return out[0], out[1]


def split_cam_passes(
    passes: Sequence[Tensor],
    batch: int,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    flip: bool = True,
    given: bool = True,
) -> list[tuple[float, bool, Tensor]]:
    """The per-view outputs of the encoder passes `multi_scale_cam` ran, in its call order.

    passes: one tensor per call of its cam_fn (rows = the images of that call); batch: B.
    Returns (scale, mirrored, rows (B, ...)) for every view except the un-mirrored scale 1.0
    (the caller's own pass when `given`), e.g. for MCIS's self-pairs."""
    ordered = [1.0] + [float(s) for s in scales if float(s) != 1.0]
    if given and not flip:  # scale 1.0 then runs no pass at all
        ordered = ordered[1:]
    if len(passes) != len(ordered):
        raise ValueError(f"{len(passes)} CAM passes recorded for {len(ordered)} calls")
    views = []
    for s, out in zip(ordered, passes):
        if s == 1.0 and given:
            views += [(s, True, out)] if flip else []
        elif flip:
            views += ([] if s == 1.0 else [(s, False, out[:batch])]) + [(s, True, out[batch:])]
        elif s != 1.0:
            views.append((s, False, out))
    return views


def box_mask(img_box: Tensor, height: int, width: int) -> Tensor:
    """(B, H, W) bool, True inside each box [y0, y1, x0, x1] (end exclusive, clipped to the map)."""
    box = img_box.to(torch.long)
    ys = torch.arange(height, device=box.device)
    xs = torch.arange(width, device=box.device)
    in_y = (ys >= box[:, 0, None]) & (ys < box[:, 1, None])  # (B, H)
    in_x = (xs >= box[:, 2, None]) & (xs < box[:, 3, None])  # (B, W)
    return in_y[:, :, None] & in_x[:, None, :]


def box_to_grid(img_box: Tensor, stride: int) -> Tensor:
    """Box in input pixels -> box on a stride-`stride` token grid (fix for reference bug B1).

    [floor(y0/s), ceil(y1/s), floor(x0/s), ceil(x1/s)]: every token that overlaps real pixels.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    lo, hi = img_box[:, 0::2], img_box[:, 1::2]  # (y0, x0), (y1, x1)
    if img_box.is_floating_point():
        lo, hi = torch.floor(lo / stride), torch.ceil(hi / stride)
    else:
        lo = torch.div(lo, stride, rounding_mode="floor")
        hi = -torch.div(-hi, stride, rounding_mode="floor")
    return torch.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], dim=1).to(img_box.dtype)


def cam_to_label(
    cam: Tensor,
    cls_label: Tensor,
    img_box: Tensor | None = None,
    bkg_thre: float = 0.5,
    high_thre: float = 0.7,
    low_thre: float = 0.25,
    ignore_mid: bool = False,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor]:
    """Threshold CAMs into a label map (S2.2).

    valid = y * cam (absent classes zeroed); (v, k) = max/argmax over classes; label = k + 1,
    0 where v <= bkg_thre. With ignore_mid: v > high -> class, low < v <= high -> ignore,
    v <= low -> 0 (bkg_thre unused). Pixels outside img_box -> ignore.

    Returns (valid (B, C-1, H, W), label (B, H, W) long).
    """
    valid = cam * cls_label.to(cam.dtype)[:, :, None, None]
    v, k = valid.max(dim=1)  # first maximum on ties, as the reference
    label = k + 1
    if ignore_mid:
        label = torch.where(v <= high_thre, torch.full_like(label, ignore_index), label)
        label = torch.where(v <= low_thre, torch.zeros_like(label), label)
    else:
        label = torch.where(v <= bkg_thre, torch.zeros_like(label), label)
    if img_box is not None:
        inside = box_mask(img_box.to(cam.device), *cam.shape[-2:])
        label = torch.where(inside, label, torch.full_like(label, ignore_index))
    return valid, label


def cam_to_roi_mask(
    cam: Tensor, cls_label: Tensor, low_thre: float = 0.25, high_thre: float = 0.7
) -> Tensor:
    """ROI for the CTC local crops (S2.3), int16 (B, H, W).

    v = max over present-class channels; roi = 1 (uncertain) by default, 0 (background) where
    v <= low, 2 (confident foreground) where v >= high.
    """
    v = (cam * cls_label.to(cam.dtype)[:, :, None, None]).amax(dim=1)
    roi = torch.ones(v.shape, dtype=torch.int16, device=v.device)
    roi = roi.masked_fill(v <= low_thre, 0)
    return roi.masked_fill(v >= high_thre, 2)


@torch.no_grad()
def refine_cams_with_bkg(
    par: PAR,
    images: Tensor,
    cams: Tensor,
    cls_label: Tensor,
    img_box: Tensor | None,
    high_thre: float = 0.7,
    low_thre: float = 0.25,
    down_scale: int = 2,
    ignore_index: int = 255,
) -> Tensor:
    """Two-threshold, PAR-refined segmentation pseudo labels (S2.5), batched.

    images (B, 3, H, W) in [0, 1]; cams (B, C-1, H', W'). At 1/down_scale resolution the stacks
    [bkg_h; cams] and [bkg_l; cams] (bkg a constant high_thre / low_thre) get a softmax over the
    background and present classes, PAR, a bilinear upsample to (H, W) and an argmax, giving
    label_h and label_l. Combination: foreground from label_h; background only where both say
    background; ignore otherwise and outside img_box.

    The reference loops over images and slices each one's valid channels. Here every image keeps
    K = 1 + (most classes present in any image of the batch) slots: background, its present
    classes in ascending order, then padding slots set to -inf before the softmax. Padding
    probabilities are exactly 0 and stay 0 through PAR (linear per channel) and the upsample,
    so the argmax only picks valid slots, with the reference's first-index tie-break. Both
    stacks go through one PAR call. Costs one host sync (K); PAR then propagates 2K channels
    instead of 2C, which matters for COCO's 81.

    Returns a (B, H, W) long label map.
    """
    b, _, h, w = images.shape
    size = (h // down_scale, w // down_scale)
    images = _float(images)
    cams = _float(cams)
    device = cams.device
    present = torch.cat(
        [torch.ones_like(cls_label[:, :1], dtype=torch.bool), cls_label.to(device) > 0], dim=1
    )  # (B, C), channel 0 = background
    n_valid = present.sum(dim=1)
    k = int(n_valid.max())
    # Class ids per slot: valid ones first in ascending order (unique sort keys), so slot 0 is
    # the background and argmax ties resolve to the lower class id, as in the reference.
    c = present.shape[1]
    key = (~present).to(torch.long) * c + torch.arange(c, device=device)
    slot_class = key.argsort(dim=1)[:, :k]  # (B, K)
    slot_ok = torch.arange(k, device=device) < n_valid[:, None]
    fg_index = (slot_class[:, 1:] - 1).clamp_min(0)  # padding slots read any channel; masked below
    fg = cams.gather(1, fg_index[:, :, None, None].expand(-1, -1, *cams.shape[-2:]))
    bkg = cams.new_ones((b, 1) + cams.shape[-2:])
    with torch.autocast(device_type=device.type, enabled=False):
        small = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        # Both stacks share the image, so they go through ONE PAR call side by side along the
        # channel axis (PAR is per channel): the affinities are computed once.
        planes = torch.cat([bkg * high_thre, bkg * low_thre, fg], dim=1)
        planes = F.interpolate(planes, size=size, mode="bilinear", align_corners=False)
        fg_small = planes[:, 2:]
        # (B, 2K, ...)
        stacks = torch.cat([planes[:, :1], fg_small, planes[:, 1:2], fg_small], dim=1)
        stacks = stacks.masked_fill(~slot_ok.repeat(1, 2)[:, :, None, None], float("-inf"))
        probs = torch.cat([stacks[:, :k].softmax(dim=1), stacks[:, k:].softmax(dim=1)], dim=1)
        refined = F.interpolate(
            par(small, probs), size=(h, w), mode="bilinear", align_corners=False
        )
        # (2, B, H, W)
        slot = torch.stack([refined[:, :k].argmax(dim=1), refined[:, k:].argmax(dim=1)])
    labels = slot_class.gather(1, slot.permute(1, 0, 2, 3).flatten(1)).view(b, 2, h, w)
    label_h, label_l = labels[:, 0], labels[:, 1]
    ignore = torch.full_like(label_h, ignore_index)
    label = torch.where(label_h == 0, torch.where(label_l == 0, label_h, ignore), label_h)
    if img_box is not None:
        label = torch.where(box_mask(img_box.to(device), h, w), label, ignore)
    return label
