"""Local-crop sampling for the CTC loss (S3.2, "Crop sampling" in docs/fidelity.md), batched."""

from __future__ import annotations

import torch
from torch import Tensor


def _crop_sums(roi: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """sum(roi[b, top:top+size, left:left+size]) for every (b, crop) via an integral image.

    roi (B, H, W) integer; top/left (B, n) long -> (B, n) int64, exact.
    """
    b = roi.shape[0]
    integral = roi.to(torch.int64).cumsum(dim=1).cumsum(dim=2)
    integral = torch.nn.functional.pad(integral, (1, 0, 1, 0))  # integral[y, x] = sum roi[:y, :x]
    flat = integral.reshape(b, -1)
    width = integral.shape[2]

    def at(y: Tensor, x: Tensor) -> Tensor:
        return flat.gather(1, y * width + x)

    bottom, right = top + size, left + size
    return at(bottom, right) - at(top, right) - at(bottom, left) + at(top, left)


def sample_local_crops(
    image: Tensor,
    roi: Tensor,
    num_crops: int = 8,
    crop_size: int = 96,
    neg_ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample num_crops local crops per image, centred on non-confident ROI pixels.

    roi (B, H, W): 0 background, 1 uncertain, 2 confident foreground (cam_to_roi_mask). With
    m = crop_size // 2, candidates are the positions (h0, w0) of the window roi[:, m:H-m, m:W-m]
    where roi <= 1 (every window position if an image has fewer than num_crops of them);
    num_crops distinct candidates are drawn uniformly without replacement and give the crops
    image[:, h0:h0+crop_size, w0:w0+crop_size], centred on the candidate pixel. A crop is
    negative (flag 0) when sum(roi over the crop) / crop_size^2 <= neg_ratio, else positive (1).

    Returns (crops (num_crops*B, 3, crop_size, crop_size), view-major: crop 0 of every image,
    then crop 1, ...; flags (B, num_crops) float32 on the image's device).
    """
    b, c, h, w = image.shape
    if roi.shape != (b, h, w):
        raise ValueError(f"roi must be (B, H, W) = {(b, h, w)}, got {tuple(roi.shape)}")
    m = crop_size // 2
    win_h, win_w = h - 2 * m, w - 2 * m
    if h < crop_size or w < crop_size or win_h < 1 or win_w < 1:
        raise ValueError(
            f"local crops of {crop_size} px need an image larger than the crop "
            f"(more than 2*{m} px each side); got {h}x{w}"
        )
    if num_crops > win_h * win_w:
        raise ValueError(
            f"cannot draw {num_crops} distinct crops from a {win_h}x{win_w} window of centres"
        )
    roi = roi.to(image.device)
    cand = (roi[:, m : m + win_h, m : m + win_w] <= 1).reshape(b, -1)
    too_few = cand.sum(dim=1, keepdim=True) < num_crops
    cand = cand | too_few
    # Top-k of i.i.d. uniform scores over the candidates = a uniformly random ordered subset.
    gen_device = generator.device if generator is not None else image.device
    scores = torch.rand(cand.shape, generator=generator, device=gen_device).to(image.device)
    pick = scores.masked_fill(~cand, -1.0).topk(num_crops, dim=1).indices  # (B, n)
    top, left = pick // win_w, pick % win_w

    offs = torch.arange(crop_size, device=image.device)
    rows = (top[:, :, None] + offs)[:, :, :, None]  # (B, n, S, 1)
    cols = (left[:, :, None] + offs)[:, :, None, :]  # (B, n, 1, S)
    batch = torch.arange(b, device=image.device)[:, None, None, None]
    # Channels-last view so one advanced index yields (B, n, S, S, C).
    crops = image.permute(0, 2, 3, 1)[batch, rows, cols]
    crops = crops.permute(1, 0, 4, 2, 3).reshape(num_crops * b, c, crop_size, crop_size)

    ratio = _crop_sums(roi, top, left, crop_size).to(torch.float64) / (crop_size * crop_size)
    flags = (ratio > neg_ratio).to(torch.float32)
    return crops.contiguous(), flags
