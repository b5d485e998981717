"""Dense CRF post-processing (Krähenbühl & Koltun 2011) in PyTorch: ToCo's CRF stage (S6.1).

Mean-field inference for a fully connected CRF over the pixels of each image, with

    unary      ψ_u(l_i) = -log(max(p_i(l), clip))          (pydensecrf's `unary_from_softmax`)
    pairwise   Potts, two kernels with symmetric normalisation  k̃ = D^-½ k D^-½,  D = diag(k 1):
               w_g · exp(-|p_i − p_j|² / 2 sxy_g²)                                  (smoothness)
               w_b · exp(-|p_i − p_j|² / 2 sxy_b² − |I_i − I_j|² / 2 srgb²)         (appearance)

and the update  Q ← softmax(-ψ_u + Σ_k w_k k̃_k Q)  repeated `iterations` times from
Q = softmax(-ψ_u), as pydensecrf's `DenseCRF2D.inference` does (self term included).

The appearance kernel is the permutohedral lattice of `toco.method.bilateral` (the same
approximation pydensecrf uses, so the outputs agree); the smoothness kernel is the exact Gaussian as
two 1-D convolutions (pydensecrf approximates it with a second lattice). Everything is batched and
device-agnostic. `dense_crf_pydensecrf` runs pydensecrf itself when it is installed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from toco.method.bilateral import (
    PermutohedralLattice,
    bilateral_features,
    gaussian_blur,
    gaussian_filter_exact,
)


def _batched(image: Tensor, probs: Tensor) -> tuple[Tensor, Tensor, bool]:
    single = probs.dim() == 3
    if single:
        image, probs = image.unsqueeze(0), probs.unsqueeze(0)
    if image.dim() != 4 or image.shape[1] != 3 or probs.dim() != 4:
        raise ValueError(
            f"expected image (B, 3, H, W) and probs (B, C, H, W), got "
            f"{tuple(image.shape)} and {tuple(probs.shape)}"
        )
    if image.shape[0] != probs.shape[0] or image.shape[-2:] != probs.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and probs {tuple(probs.shape)} differ in batch or size"
        )
    return image, probs, single


@torch.no_grad()
def dense_crf(
    image: Tensor,
    probs: Tensor,
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_w: float = 1.0,
    bilateral_sxy: float = 121.0,
    bilateral_srgb: float = 5.0,
    bilateral_w: float = 4.0,
    clip: float = 1e-5,
    method: str = "lattice",
) -> Tensor:
    """Mean-field dense CRF on class probabilities. The defaults are ToCo's (tools/
    infer_seg_voc.py: DenseCRF(iter_max=10, pos_w=1, pos_xy_std=1, bi_w=4, bi_xy_std=121,
    bi_rgb_std=5)).

    Args:
        image: uint8 RGB, (B, 3, H, W) or (3, H, W), values 0-255.
        probs: class probabilities (softmax output), (B, C, H, W) or (C, H, W).
        iterations: mean-field steps.
        gaussian_sxy, gaussian_w: smoothness kernel std (px) and Potts weight.
        bilateral_sxy, bilateral_srgb, bilateral_w: appearance kernel stds (px, 0-255 units)
            and Potts weight.
        clip: probabilities are clipped to [clip, 1] before the log (unary).
        method: appearance kernel by the permutohedral "lattice", or "exact" (brute force,
            O(N²): small images and tests only).
    Returns:
        refined probabilities Q, float32, same shape as `probs`, on probs' device.
    """
    image, probs, single = _batched(image, probs)
    b, c, h, w = probs.shape
    p = b * h * w
    image = image.to(probs.device)
    # Pixel-major (P, C) rows: the layout the lattice's sparse products and the channel softmax
    # want; the spatial blur reads it as a channels-last (B, H, W, C) view without copying.
    neg_unary = probs.float().clamp(clip, 1.0).log_().permute(0, 2, 3, 1).reshape(p, c)
    ones = neg_unary.new_ones(p, 1)

    def smoothness(x: Tensor) -> Tensor:
        return gaussian_blur(x.view(b, h, w, -1), gaussian_sxy, dims=(1, 2)).view(p, -1)

    norm_g = smoothness(ones).add_(1e-20).rsqrt_()  # k̃ = D^-½ K D^-½
    post_g = norm_g * gaussian_w
    feats = bilateral_features(image, bilateral_sxy, bilateral_srgb)
    if method == "lattice":
        lattice = PermutohedralLattice(feats)
        norm_b = lattice.filter_flat(ones).add_(1e-20).rsqrt_()
        # normalisation and weight folded into the lattice's splat / slice matrices
        appearance = lattice.with_scaling(pre=norm_b, post=norm_b * bilateral_w)

        def unary_and_appearance(q: Tensor) -> Tensor:
            return appearance.filter_flat(q, bias=neg_unary)
    elif method == "exact":

        def exact(x: Tensor) -> Tensor:
            out = gaussian_filter_exact(feats, x.view(b, h, w, -1).permute(0, 3, 1, 2))
            return out.permute(0, 2, 3, 1).reshape(p, -1)

        norm_b = exact(ones).add_(1e-20).rsqrt_()

        def unary_and_appearance(q: Tensor) -> Tensor:
            return exact(q * norm_b).mul_(norm_b * bilateral_w).add_(neg_unary)
    else:
        raise ValueError(f"unknown method {method!r} (lattice or exact)")

    q = torch.softmax(neg_unary, dim=1)
    for _ in range(iterations):
        energy = unary_and_appearance(q)
        energy.addcmul_(smoothness(q * norm_g), post_g)
        q = torch.softmax(energy, dim=1)
    q = q.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()
    return q[0] if single else q


def pydensecrf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf_pydensecrf(
    image: Tensor,
    probs: Tensor,
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_w: float = 1.0,
    bilateral_sxy: float = 121.0,
    bilateral_srgb: float = 5.0,
    bilateral_w: float = 4.0,
    clip: float = 1e-5,
) -> Tensor:
    """The same CRF through pydensecrf (C++, CPU, one image at a time), for comparison.
    Install it with `pip install "cython<3" && pip install --no-build-isolation pydensecrf2`."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError(
            "the pydensecrf CRF backend needs pydensecrf2: pip install "
            "'cython<3' && pip install --no-build-isolation pydensecrf2"
        ) from e
    image, probs, single = _batched(image, probs)
    b, c, h, w = probs.shape
    out = np.empty((b, c, h, w), dtype=np.float32)
    imgs = image.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    prob_np = probs.detach().float().cpu().numpy()
    for i in range(b):
        crf = dcrf.DenseCRF2D(w, h, c)
        unary = -np.log(np.clip(prob_np[i], clip, 1.0)).reshape(c, -1)
        crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_w)
        crf.addPairwiseBilateral(
            sxy=bilateral_sxy,
            srgb=bilateral_srgb,
            rgbim=np.ascontiguousarray(imgs[i]),
            compat=bilateral_w,
        )
        out[i] = np.asarray(crf.inference(iterations), dtype=np.float32).reshape(c, h, w)
    q = torch.from_numpy(out).to(probs.device)
    return q[0] if single else q


CRF_BACKENDS: dict[str, Callable[..., Tensor]] = {
    "torch": dense_crf,
    "pydensecrf": dense_crf_pydensecrf,
}
