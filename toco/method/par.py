"""PAR: pixel-adaptive refinement of pseudo-label masks (S2.4 in docs/fidelity.md).

For every pixel the 8 neighbours of a 3x3 window are taken at each dilation d (raster order
TL, T, TR, L, R, BL, B, BR; coordinates clamped at the border), giving N = 8 * len(dilations)
neighbours. With the image I and masks M:

    kappa_rgb_n = -( |I_n - I| / (sigma_I + 1e-8) / w1 )^2   averaged over colour channels
    kappa_pos_n = -( dist_n / (sigma_pos + 1e-8) / w1 )^2
    A_n = softmax_n(kappa_rgb) + w2 * softmax_n(kappa_pos)
    M <- sum_n A_n M_n     (num_iter times; the centre pixel is not included)

sigma_I is the unbiased std of the N neighbour values (per pixel and colour channel) and
sigma_pos the unbiased std of the N neighbour distances (d axial, sqrt(2) d diagonal).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (dy, dx) of the 8 neighbours in raster order; the centre is excluded.
_OFFSETS: tuple[tuple[int, int], ...] = tuple(
    (dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
)


def _neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """Pixel offsets of all N neighbours, dilation-major then raster order."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _OFFSETS]


def _gather_neighbours(x: Tensor, offsets: Sequence[tuple[int, int]], pad: int) -> Tensor:
    """x (B, C, H, W) -> (B, C, N, H, W): value at each offset with clamped coordinates.

    One replicate pad by the largest offset serves every dilation, since clamping to the border is
    the same whatever the pad width.
    """
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return torch.stack(
        [padded[..., pad + oy : pad + oy + h, pad + ox : pad + ox + w] for oy, ox in offsets], dim=2
    )


class PAR(nn.Module):
    """Pixel-adaptive refinement (ToCo/AFA PAR); the affinities A are computed once per call.

    Args:
        num_iter: propagation steps.
        dilations: neighbourhood dilations d (8 neighbours each).
        w1: temperature of the colour and position kernels.
        w2: weight of the positional softmax.
    """

    def __init__(
        self,
        num_iter: int = 10,
        dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
        w1: float = 0.3,
        w2: float = 0.01,
    ) -> None:
        super().__init__()
        if num_iter < 0:
            raise ValueError(f"PAR num_iter must be >= 0, got {num_iter}")
        if not dilations or min(dilations) < 1:
            raise ValueError(
                f"PAR dilations must be a non-empty list of ints >= 1, got {dilations}"
            )
        self.num_iter = int(num_iter)
        self.dilations = tuple(int(d) for d in dilations)
        self.w1 = float(w1)
        self.w2 = float(w2)
        self._offsets = _neighbour_offsets(self.dilations)
        self._pad = max(self.dilations)
        # softmax_n(kappa_pos) depends only on the dilations: a constant (N,) vector.
        dist = torch.tensor([math.hypot(oy, ox) for oy, ox in self._offsets], dtype=torch.float64)
        kappa_pos = -((dist / (dist.std() + 1e-8) / self.w1) ** 2)
        self.register_buffer("pos_weight", torch.softmax(kappa_pos, dim=0), persistent=False)

    def extra_repr(self) -> str:
        return f"num_iter={self.num_iter}, dilations={self.dilations}, w1={self.w1}, w2={self.w2}"

    def affinity(self, image: Tensor) -> Tensor:
        """A of shape (B, N, H, W) for image (B, 3, H, W); sums to 1 + w2 over n."""
        nb = _gather_neighbours(image, self._offsets, self._pad)  # I_n: (B, 3, N, H, W)
        n = nb.shape[2]
        # Unbiased sigma_I over the N neighbour values; two-pass by hand because torch.std's
        # Welford reduction over a middle dim is ~6x slower on CPU.
        centred = nb - nb.mean(dim=2, keepdim=True)
        sigma = centred.square_().sum(dim=2, keepdim=True).div_(n - 1).sqrt_()
        # -(|I_n - I| / (sigma + 1e-8) / w1)^2 averaged over colour channels; the abs is dropped
        # because it is squared.
        scale = (sigma + 1e-8).mul_(self.w1).reciprocal_()
        kappa = (nb - image.unsqueeze(2)).mul_(scale).square_().mean(dim=1).neg_()  # (B, N, H, W)
        # PAR has no parameters, so callers need not move it: follow the image's device.
        pos = self.pos_weight.to(device=kappa.device, dtype=kappa.dtype).view(1, -1, 1, 1)
        return torch.softmax(kappa, dim=1).add_(pos, alpha=self.w2)

    def propagate(self, masks: Tensor, aff: Tensor) -> Tensor:
        """num_iter steps of M <- sum_n A_n M_n; masks (B, K, H, W), aff (B, N, H, W)."""
        h, w = masks.shape[-2:]
        pad = self._pad
        for _ in range(self.num_iter):
            padded = F.pad(masks, (pad, pad, pad, pad), mode="replicate")
            out = torch.zeros_like(masks)
            for n, (oy, ox) in enumerate(self._offsets):
                window = padded[..., pad + oy : pad + oy + h, pad + ox : pad + ox + w]
                out.addcmul_(window, aff[:, n : n + 1])
            masks = out
        return masks

    @torch.no_grad()
    def forward(self, image: Tensor, masks: Tensor) -> Tensor:
        """Refine masks (B, K, h, w) with image (B, 3, H, W); returns (B, K, H, W).

        Pseudo-label refinement only: no gradient flows (the maths uses in-place ops). The result
        is in at least fp32.
        """
        if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
            raise ValueError(
                f"PAR expects image (B, 3, H, W) and masks (B, K, h, w); got {tuple(image.shape)} "
                f"and {tuple(masks.shape)}"
            )
        # Affinities are a ratio of small differences: compute them in at least fp32, also under
        # autocast, whatever the caller's precision.
        dtype = torch.promote_types(torch.promote_types(image.dtype, masks.dtype), torch.float32)
        with torch.autocast(device_type=image.device.type, enabled=False):
            image = image.to(dtype)
            masks = masks.to(dtype)
            if masks.shape[-2:] != image.shape[-2:]:
                masks = F.interpolate(
                    masks, size=image.shape[-2:], mode="bilinear", align_corners=True
                )
            return self.propagate(masks, self.affinity(image))
