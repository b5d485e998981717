"""ToCo's training augmentation (S4.2): geometric steps and the photometric views.

Randomness: only Python ``random`` and ``torch`` RNGs are used, so torch's per-worker seeding
(``base_seed + worker_id`` for both) makes DataLoader runs reproducible once ``torch.manual_seed``
and ``random.seed`` are set in the main process. ``seed_worker`` is provided for callers that add
numpy-based transforms of their own.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps


def random_scale(img: Image.Image, scale_range: tuple[float, float]) -> Image.Image:
    """Step 2: rescale both sides by r ~ U(scale_range), bilinear."""
    r = random.uniform(*scale_range)
    size = (max(1, int(r * img.width)), max(1, int(r * img.height)))
    return img if size == img.size else img.resize(size, Image.Resampling.BILINEAR)


def random_hflip(img: Image.Image) -> Image.Image:
    """Step 3: the geometric flip, shared by the main and local views."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() > 0.5 else img


def random_crop_with_box(img: np.ndarray, size: int) -> tuple[np.ndarray, list[int]]:
    """Step 4: zero-pad to at least ``size`` at a random offset, then random-crop ``size``.

    Returns the crop and img_box = [y0, y1, x0, x1] (end exclusive), the crop's real pixels.
    """
    h, w = img.shape[:2]
    canvas_h, canvas_w = max(size, h), max(size, w)
    oy, ox = random.randint(0, canvas_h - h), random.randint(0, canvas_w - w)
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    canvas[oy : oy + h, ox : ox + w] = img
    cy, cx = random.randint(0, canvas_h - size), random.randint(0, canvas_w - size)
    crop = canvas[cy : cy + size, cx : cx + size]
    box = [max(oy - cy, 0), min(oy + h - cy, size), max(ox - cx, 0), min(ox + w - cx, size)]
    return crop, box


class PhotometricView:
    """flip (opt.) → ColorJitter p=0.8 → RandomGrayscale 0.2 → GaussianBlur → solarize."""

    def __init__(self, flip: bool, blur_p: float, solarize_p: float, photometric: bool = True):
        self.flip = T.RandomHorizontalFlip(0.5) if flip else None
        self.colour = T.Compose(
            [
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(0.2),
            ]
        )
        self.blur_p, self.solarize_p, self.photometric = blur_p, solarize_p, photometric

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.flip is not None:
            img = self.flip(img)
        if not self.photometric:
            return img
        img = self.colour(img)
        if random.random() < self.blur_p:
            img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        if random.random() < self.solarize_p:
            img = ImageOps.solarize(img, threshold=128)
        return img


def to_uint8_chw(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 (3, H, W); the transpose copy in numpy is much cheaper than torch's here."""
    hwc = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy's global RNG from torch's per-worker seed.

    torch already seeds ``random`` and ``torch`` per worker (and numpy since 1.9); this keeps
    numpy-based transforms reproducible regardless of torch version.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
