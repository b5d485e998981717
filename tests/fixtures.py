"""Builders of tiny VOC-format trees on disk, for dataset tests and training smoke tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from datasets.voc import voc_palette


@dataclass
class ImageSpec:
    """One image of a test tree.

    Args:
        name: image id.
        mask: uint8 (H, W) class ids, 255 = ignore; None writes no mask.
        image_hw: JPEG size (height, width); defaults to the mask's (differ to test mismatches).
        mode: JPEG colour mode ('RGB', 'L' or 'CMYK').
        mask_mode: PNG mode ('P' palette, 'L' grayscale, 'RGB' for a wrong mask).
    """

    name: str
    mask: np.ndarray | None
    image_hw: tuple[int, int] | None = None
    mode: str = "RGB"
    mask_mode: str = "P"

    @property
    def hw(self) -> tuple[int, int]:
        if self.image_hw is not None:
            return self.image_hw
        assert self.mask is not None, "an ImageSpec without a mask needs image_hw"
        return self.mask.shape


def image_pixels(h: int, w: int) -> np.ndarray:
    """Smooth, left-right asymmetric content in 40..220, so flips and padding are visible."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 40 + 170 * xx / max(w - 1, 1)
    g = 40 + 170 * yy / max(h - 1, 1)
    b = np.full_like(r, 120)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def boxes_mask(
    h: int, w: int, boxes: Iterable[tuple[int, int, int, int, int]], border: bool = True
) -> np.ndarray:
    """Background mask with class rectangles (cls, y0, y1, x0, x1), each ringed by 255."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for cls, y0, y1, x0, x1 in boxes:
        if border:
            mask[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = 255
        mask[y0:y1, x0:x1] = cls
    return mask


def write_jpeg(path: Path, hw: tuple[int, int], mode: str = "RGB") -> None:
    img = Image.fromarray(image_pixels(*hw))
    img.convert(mode).save(path, quality=95)


def write_mask_png(path: Path, mask: np.ndarray, mode: str = "P") -> None:
    """Class ids as palette indices (VOC style), as grayscale values, or as an RGB picture."""
    if mode == "P":
        img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
        img.putpalette(voc_palette())
    elif mode == "L":
        img = Image.frombytes("L", (mask.shape[1], mask.shape[0]), mask.tobytes())
    else:
        img = Image.fromarray(np.stack([mask] * 3, axis=-1)).convert(mode)
    img.save(path)


def make_voc_tree(
    root: Path,
    specs: Sequence[ImageSpec],
    splits: dict[str, Sequence[str]] | None = None,
    mask_folder: str = "SegmentationClass",
) -> Path:
    """Write ``specs`` as a VOC-style tree under ``root``; default split: 'train' = all ids."""
    root = Path(root)
    image_dir, mask_dir = root / "JPEGImages", root / mask_folder
    split_dir = root / "ImageSets" / "Segmentation"
    for folder in (image_dir, mask_dir, split_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        write_jpeg(image_dir / f"{spec.name}.jpg", spec.hw, spec.mode)
        if spec.mask is not None:
            write_mask_png(mask_dir / f"{spec.name}.png", spec.mask, spec.mask_mode)
    for split, names in (splits or {"train": [s.name for s in specs]}).items():
        (split_dir / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def standard_specs() -> list[ImageSpec]:
    """Five images of different sizes and colour modes with known classes (VOC ids).

    img_a {1, 15}, img_b {7} (grayscale JPEG), img_c {20} (CMYK JPEG), img_d {} (only
    background and ignore), img_e {3, 12} (grayscale 'L' mask).
    """
    mask_d = np.zeros((30, 40), dtype=np.uint8)
    mask_d[10:14, 10:30] = 255
    return [
        ImageSpec("img_a", boxes_mask(40, 60, [(1, 5, 20, 5, 25), (15, 22, 38, 30, 55)])),
        ImageSpec("img_b", boxes_mask(50, 30, [(7, 10, 40, 5, 25)]), mode="L"),
        ImageSpec("img_c", boxes_mask(36, 36, [(20, 0, 36, 10, 20)]), mode="CMYK"),
        ImageSpec("img_d", mask_d),
        ImageSpec("img_e", boxes_mask(44, 52, [(3, 2, 10, 2, 10), (12, 20, 40, 20, 50)]),
                  mask_mode="L"),  # fmt: skip
    ]


STANDARD_LABELS: dict[str, list[int]] = {
    "img_a": [1, 15],
    "img_b": [7],
    "img_c": [20],
    "img_d": [],
    "img_e": [3, 12],
}

STANDARD_SPLITS: dict[str, list[str]] = {
    "train": ["img_a", "img_b", "img_c", "img_d", "img_e"],
    "val": ["img_a", "img_d", "img_e"],
    "test": ["img_b", "img_c"],
}


def make_standard_voc_tree(root: Path) -> Path:
    """The five ``standard_specs`` images with the ``STANDARD_SPLITS`` lists."""
    return make_voc_tree(root, standard_specs(), STANDARD_SPLITS)
