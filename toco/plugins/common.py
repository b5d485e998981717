"""Small pieces shared by the seed plug-ins: projection heads, masked means, per-step RNGs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Stand-in for -inf in masked logsumexp / softmax: a row with every entry masked must still have
# finite gradients (logsumexp of an all -inf row back-propagates NaN, even times a zero gradient).
MASKED_LOGIT = -1e30


class ProjectionHead(nn.Module):
    """Per-token MLP D -> hidden -> out (GELU between), applied to (B, D, h, w) token maps.

    Returns (B, h, w, out), channel-last, not normalised (callers normalise where the paper does).

    Args:
        in_dim: D.
        hidden_dim: width of the hidden layer.
        out_dim: embedding width.
        final_relu: a ReLU on the output (PPC's official head; restricts cosines to [0, 1]).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, final_relu: bool = False
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.final_relu = final_relu

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.fc2(F.gelu(self.fc1(tokens.permute(0, 2, 3, 1))))
        return F.relu(x) if self.final_relu else x


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` (same shape) is true; 0 (still in the graph) when empty.

    No host sync: the count is clamped on the device.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def step_seed(seed: int, iteration: int, rank: int, salt: int) -> int:
    """A 63-bit seed from (seed, iteration, rank, salt): per-step randomness that needs no
    saved generator state, so a resumed run draws exactly what the uninterrupted one drew."""
    mixed = np.random.SeedSequence([seed & 0xFFFFFFFF, iteration, rank, salt]).generate_state(2)
    return int(mixed[0]) << 31 ^ int(mixed[1])


def step_generator(
    device: torch.device, seed: int, iteration: int, rank: int, salt: int
) -> torch.Generator:
    """A torch generator on `device` seeded with `step_seed(...)`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(step_seed(seed, iteration, rank, salt) % (2**63 - 1))
    return gen


def minmax_normalise(cam: Tensor, eps: float = 1e-5) -> Tensor:
    """Per (image, class) min-max normalisation of (B, K, h, w) maps to [0, 1), as ToCo's CAMs."""
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (cam.amax(dim=(-2, -1), keepdim=True) + eps)


def tokens_in_box(
    img_box: Tensor,
    image_hw: tuple[int, int],
    grid_hw: tuple[int, int],
    stride_px: tuple[float, float],
) -> Tensor:
    """(B, h, w) bool: token centres of a grid whose cells are `stride_px` image pixels, inside
    each box [y0, y1, x0, x1] (pixels of an image of size `image_hw`)."""
    device = img_box.device
    ys = (torch.arange(grid_hw[0], device=device, dtype=torch.float32) + 0.5) * stride_px[0]
    xs = (torch.arange(grid_hw[1], device=device, dtype=torch.float32) + 0.5) * stride_px[1]
    box = img_box.to(torch.float32)
    in_y = (ys >= box[:, 0, None]) & (ys < box[:, 1, None])
    in_x = (xs >= box[:, 2, None]) & (xs < box[:, 3, None])
    return in_y[:, :, None] & in_x[:, None, :]
