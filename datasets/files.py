"""Reading and writing dataset files; every failure is a one-line DataError naming the file.

Images travel as PIL RGB images (grayscale/CMYK/palette JPEGs are converted), masks as uint8
(H, W) arrays of class ids read from the PNG's pixel INDEX (never its colour); 255 = ignore.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toco import atomic
from toco.errors import DataError, UserError
from toco.images import pil_to_rgb

IGNORE_INDEX = 255
MAX_LISTED = 5  # how many offending names an error message spells out


def first_few(names: list[str]) -> str:
    """'a, b, c, d, e, ...': the start of a list of offending names, for one-line messages."""
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (", ..." if len(names) > MAX_LISTED else "")


def stems(folder: Path, suffix: str) -> set[str]:
    """Names in ``folder`` ending in ``suffix``, without it; one listdir beats N stat calls."""
    return {n[: -len(suffix)] for n in os.listdir(folder) if n.endswith(suffix)}


@functools.lru_cache(maxsize=1)
def _palette() -> tuple[int, ...]:
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return tuple(palette)


def voc_palette() -> list[int]:
    """The standard 256-entry VOC colour map (bit-interleaved), flattened to 768 ints."""
    return list(_palette())


def palette_png_bytes(mask: np.ndarray, compress_level: int = 6) -> bytes:
    """A class-id mask as a VOC palette PNG (deterministic bytes for the same mask and level;
    zlib level 1 encodes a 480x640 mask in 0.65 ms instead of 1.6, in twice the bytes)."""
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    img.putpalette(voc_palette())
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def save_palette_png(mask: np.ndarray, path: Path) -> None:
    """Index PNG with the VOC palette, as in VOC's SegmentationClass."""
    Path(path).write_bytes(palette_png_bytes(mask))


def read_rgb(path: Path) -> Image.Image:
    """Fully decoded RGB image; grayscale/CMYK/palette are converted, broken files are DataError."""
    try:
        with Image.open(path) as img:
            img.load()  # forces the full decode, so truncated files fail here, not in a worker
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def read_display_rgb(path: Path) -> Image.Image:
    """The image as predict.py reads it: EXIF orientation applied, 16-bit scaled to 8 bit,
    transparency over white (toco.images); broken files are DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            return Image.fromarray(pil_to_rgb(img))
    except (OSError, SyntaxError, ValueError, UserError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # the ones that swap width and height


def display_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (after EXIF orientation), from the header."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            turned = img.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return (h, w) if turned else (w, h)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def read_mask(path: Path) -> np.ndarray:
    """Class-index mask as uint8 (H, W); for palette PNGs the index, never the colour."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"mask {path} has mode {img.mode}; expected a palette ('P') or grayscale "
                    "('L') PNG whose pixel values are class ids"
                )
            return np.array(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from exc


def check_mask_values(mask: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Pixel counts per value (length 256); raises if a value is neither a class id nor 255."""
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        raise DataError(
            f"mask {path} holds values {bad} outside 0..{num_classes - 1} and {IGNORE_INDEX}"
        )
    return counts


def check_same_size(
    mask_hw: tuple[int, int], image_wh: tuple[int, int], mask: Path, image: Path
) -> None:
    if (mask_hw[1], mask_hw[0]) != tuple(image_wh):
        raise DataError(
            f"mask {mask} is {mask_hw[1]}x{mask_hw[0]} but image {image} is "
            f"{image_wh[0]}x{image_wh[1]} (width x height)"
        )


def sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Readers never see a half-written file: a sibling temp file, then os.replace (see
    toco.atomic; the file gets the user's usual mode)."""
    atomic.write_bytes_atomic(path, payload)


def write_json_atomic(path: Path, payload: Any) -> None:
    """JSON written with ``write_bytes_atomic``."""
    write_bytes_atomic(path, json.dumps(payload, separators=(",", ":")).encode())


def read_json(path: Path, what: str = "file") -> Any:
    """Parsed JSON; a missing, unreadable or malformed file is a DataError naming it."""
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from exc
