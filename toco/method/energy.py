"""ToCo's regularisation loss: the gated dense CRF energy of rloss (S3.5 in docs/fidelity.md).

With S the softmax of the decoder logits at the image size, the ROI (1 inside the image box),
the pseudo label L (255 = ignore) and the 0-255 image I, all taken to scale s (0.5):

    S_s = bilinear(S), I_s = nearest(I), ROI_s = nearest(ROI), L_s = nearest(L)
    Gate = max(ROI_s − max_k S_s,k , 0), and 1 where L_s = 255               (held fixed)
    S'   = S_s · ROI_s
    E    = −(1/B) Σ_{k,i} S'_ki · Gate_i · (K S'_k)_i

where K is the un-normalised bilateral filter over (x/σxy', y/σxy', RGB/σrgb), σxy' = σxy·s,
self term included: the permutohedral lattice of `toco.method.bilateral`, the same approximation as
rloss's C++ filter. The loss returned is inner_weight · E (1e-7, as ToCo hard-codes); the
engine's w_reg (0.05) multiplies it again.

Gradient. By default it is the exact derivative of E with the gate held fixed, by autograd:
dE/dS' = −(1/B) (Gate ⊙ K S' + Kᵀ(Gate ⊙ S')). ToCo/rloss instead return −(2/B) Gate ⊙ K S'
(exact only for a symmetric K and a constant gate); `reference_gradient=True` restores it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from toco.method.bilateral import PermutohedralLattice, bilateral_features, gaussian_filter_exact
from toco.method.cam import box_mask
from toco.method.step import LossModule, StepState


def dense_energy_loss(
    image: Tensor,
    probs: Tensor,
    roi: Tensor,
    label: Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    scale_factor: float = 0.5,
    reference_gradient: bool = False,
    method: str = "lattice",
) -> Tensor:
    """Gated dense CRF energy E (without the 1e-7 inner weight), a scalar.

    Args:
        image: (B, 3, H, W) colours in 0-255 units.
        probs: (B, C, H, W) class probabilities (softmax of the logits at the image size).
        roi: (B, H, W) 1 (True) inside the region holding real pixels, 0 in the padding.
        label: (B, H, W) pseudo label, 255 = ignored pixel.
        sigma_rgb, sigma_xy: kernel stds in 0-255 colour units and in full-resolution pixels.
        scale_factor: the energy is evaluated at this scale (σxy scales with it).
        reference_gradient: use ToCo's −(2/B)·Gate·KS' instead of the exact gradient.
        method: "lattice" (fast) or "exact" (brute force, small inputs; for tests).
    """
    b = probs.shape[0]
    if probs.dtype in (torch.float16, torch.bfloat16):
        probs = probs.float()  # the sparse lattice products want float32 or float64
    kw = dict(scale_factor=scale_factor, recompute_scale_factor=True)
    img_s = F.interpolate(image.to(probs.dtype), mode="nearest", **kw)
    probs_s = F.interpolate(probs, mode="bilinear", align_corners=False, **kw)
    roi_s = F.interpolate(roi[:, None].float(), mode="nearest", **kw)  # (B,1,h,w)
    label_s = F.interpolate(label[:, None].float(), mode="nearest", **kw)
    with torch.no_grad():
        gate = (roi_s - probs_s.amax(1, keepdim=True)).masked_fill_(label_s == 255, 1.0)
        gate = gate.clamp_(min=0.0)
    seg = probs_s * roi_s
    feats = bilateral_features(img_s, sigma_xy * scale_factor, sigma_rgb)
    if method == "exact":
        filt = functools.partial(gaussian_filter_exact, feats)
    elif method == "lattice":
        filt = PermutohedralLattice(feats)
    else:
        raise ValueError(f"unknown method {method!r} (lattice or exact)")
    if not reference_gradient:
        return -(seg * gate * filt(seg)).sum() / b
    gated = gate * filt(seg.detach())
    surrogate = -2.0 * (seg * gated).sum() / b  # its gradient: -(2/B) Gate·KS'·ROI
    value = -(seg.detach() * gated).sum() / b
    return surrogate + (value - surrogate).detach()


class RegularizationLoss(LossModule):
    """ToCo's `reg` term: the gated dense CRF energy of the decoder's softmax (S3.5).

    Args:
        weight: w_reg (0.05 in ToCo); start_iter: its switch-on iteration (with the seg loss).
        sigma_rgb, sigma_xy, scale_factor: the kernel and the working scale (15, 100, 0.5).
        inner_weight: ToCo's hard-coded 1e-7 factor inside the returned value.
        reference_gradient: ToCo's symmetric-kernel gradient instead of the exact one.
    """

    names = ("reg",)
    needs_decoder = True

    def __init__(
        self,
        weight: float,
        start_iter: int = 0,
        sigma_rgb: float = 15.0,
        sigma_xy: float = 100.0,
        scale_factor: float = 0.5,
        inner_weight: float = 1e-7,
        reference_gradient: bool = False,
    ) -> None:
        super().__init__(weight, start_iter)
        self.sigma_rgb = sigma_rgb
        self.sigma_xy = sigma_xy
        self.scale_factor = scale_factor
        self.inner_weight = inner_weight
        self.reference_gradient = reference_gradient

    def compute(self, state: StepState) -> dict[str, Tensor]:
        image = state.images * 255.0
        h, w = image.shape[-2:]
        logits = F.interpolate(state.seg_logits, size=(h, w), mode="bilinear", align_corners=False)
        energy = dense_energy_loss(
            image,
            torch.softmax(logits, dim=1),
            box_mask(state.img_box, h, w),
            state.pseudo_label,
            self.sigma_rgb,
            self.sigma_xy,
            self.scale_factor,
            self.reference_gradient,
        )
        return {"reg": self.inner_weight * energy}

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, start_iter={self.start_iter}, "
            f"sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, "
            f"scale_factor={self.scale_factor}, inner_weight={self.inner_weight}"
        )
