"""Any image a user hands over, as the (H, W, 3) uint8 RGB array the model is fed.

Accepted: a path, a PIL image or a numpy array. EXIF orientation is applied (the mask then has
the size the image is displayed at); grayscale, palette, CMYK and the other PIL modes become
RGB; transparent images are composited over white (fully transparent pixels often hold
arbitrary colours); 16-bit images are scaled to 8 bit (65535 -> 255).

Numpy arrays are (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (RGB(A) channel order, as PIL and
imageio give; OpenCV's BGR must be flipped by the caller). Their values are read by dtype:
uint8 as is, bool as 0/255, uint16 over its full range, float in [0, 1] (or, where the maximum
is above 1, in [0, 255]), other integer types by their range (at most 255: 8 bit, at most
65535: 16 bit).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from toco.errors import UserError

ImageInput = str | os.PathLike | Image.Image | np.ndarray
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image file at `path` as (H, W, 3) uint8; an unreadable file is a UserError."""
    try:
        with Image.open(path) as img:
            img.load()  # decode everything now: a truncated file fails here, with its name
            return pil_to_rgb(img)
    except READ_ERRORS as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode, EXIF-rotated, as (H, W, 3) uint8."""
    img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        # Pillow opens 16-bit grayscale as 'I;16' or 'I'; convert('L') would clip, not scale.
        return array_to_rgb(np.clip(np.asarray(img), 0, 65535).astype(np.uint16))
    if img.mode == "F":
        return array_to_rgb(np.asarray(img))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        return _over_white(np.asarray(img.convert("RGBA")))
    return np.asarray(img.convert("RGB"))


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """A numpy image (see the module docstring) as (H, W, 3) uint8."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise UserError(
            f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
            f"got shape {tuple(a.shape)}"
        )
    if min(a.shape[:2]) == 0:
        raise UserError(f"an image array must not be empty; got shape {tuple(a.shape)}")
    a = _to_uint8(a)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.shape[-1] == 4:
        return _over_white(a)
    return np.ascontiguousarray(a)


def to_rgb(image: ImageInput) -> np.ndarray:
    """Any accepted input (path, PIL image, numpy array) as (H, W, 3) uint8."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return array_to_rgb(image)
    raise UserError(
        f"an image must be a path, a PIL image or a numpy array; got {type(image).__name__}"
    )


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return _scaled(a, 65535)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise UserError("an image array holds NaN or infinite values")
        return _scaled(a, 1.0 if a.max() <= 1.0 else 255.0)
    if np.issubdtype(a.dtype, np.integer):
        low, high = int(a.min()), int(a.max())
        if low < 0 or high > 65535:
            raise UserError(
                f"an integer image array must hold values in 0..255 or 0..65535; "
                f"got {low}..{high} ({a.dtype})"
            )
        return _scaled(a, 255 if high <= 255 else 65535)
    raise UserError(f"an image array of dtype {a.dtype} is not an image")


def _scaled(a: np.ndarray, full: float) -> np.ndarray:
    """Values in [0, full] mapped to 0..255, rounded (65535 / 257 = 255 exactly)."""
    return np.clip(np.rint(a.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 composited over a white background -> (H, W, 3) uint8."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
