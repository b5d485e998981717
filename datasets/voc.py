"""PASCAL-VOC-style segmentation datasets: layout, image-level labels, ToCo training views.

A VOC-style tree is::

    root/JPEGImages/<id>.jpg
    root/SegmentationClassAug/<id>.png   (preferred when the folder exists)
    root/SegmentationClass/<id>.png      (otherwise)
    root/ImageSets/Segmentation/<split>.txt

Masks are palette (or grayscale) PNGs whose pixel INDEX is the class id; 255 means ignore.
Images travel as uint8 CHW tensors (the model normalises), masks as int64 (H, W) tensors.

Randomness: only Python ``random`` and ``torch`` RNGs are used, so torch's per-worker seeding
(``base_seed + worker_id`` for both) makes DataLoader runs reproducible once ``torch.manual_seed``
and ``random.seed`` are set in the main process. ``seed_worker`` is provided for callers that add
numpy-based transforms of their own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset

from toco.errors import ConfigError, DataError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

IGNORE_INDEX = 255
LABEL_CACHE_VERSION = 1
_MAX_LISTED = 5  # how many offending names an error message spells out


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


def _first_few(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (", ..." if len(names) > _MAX_LISTED else "")


def _stems(folder: Path, suffix: str) -> set[str]:
    """Names in ``folder`` ending in ``suffix``, without it; one listdir beats N stat calls."""
    return {n[: -len(suffix)] for n in os.listdir(folder) if n.endswith(suffix)}


# --------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class VOCLayout:
    """Resolved folders of a VOC-style tree; construction checks the parts every use needs."""

    root: Path

    def __post_init__(self) -> None:
        root = Path(self.root).expanduser()
        object.__setattr__(self, "root", root)
        if not root.is_dir():
            raise DataError(f"dataset root {root} does not exist or is not a folder")
        if not self.image_dir.is_dir():
            raise DataError(
                f"{self.image_dir} not found: a VOC-style root needs JPEGImages/, "
                "SegmentationClass[Aug]/ and ImageSets/Segmentation/"
            )

    @property
    def image_dir(self) -> Path:
        return self.root / "JPEGImages"

    @property
    def split_dir(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"

    @property
    def mask_dir(self) -> Path | None:
        """SegmentationClassAug (the SBD-augmented masks) wins over SegmentationClass."""
        for name in ("SegmentationClassAug", "SegmentationClass"):
            if (self.root / name).is_dir():
                return self.root / name
        return None

    def require_mask_dir(self) -> Path:
        mask_dir = self.mask_dir
        if mask_dir is None:
            raise DataError(f"{self.root} has neither SegmentationClassAug/ nor SegmentationClass/")
        return mask_dir

    def image_path(self, name: str) -> Path:
        return self.image_dir / f"{name}.jpg"

    def mask_path(self, name: str) -> Path:
        return self.require_mask_dir() / f"{name}.png"

    def available_splits(self) -> list[str]:
        if not self.split_dir.is_dir():
            return []
        return sorted(_stems(self.split_dir, ".txt"))

    def read_split(self, split: str) -> list[str]:
        """Ids of ``split`` in file order, checked: present, unique, non-empty, images exist."""
        path = self.split_dir / f"{split}.txt"
        if not path.is_file():
            known = ", ".join(self.available_splits()) or "none"
            raise DataError(f"split file {path} not found (splits in {self.split_dir}: {known})")
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read split file {path}: {exc}") from exc
        names = []
        for number, line in enumerate(lines, start=1):
            name = line.strip()
            if not name:
                continue
            if len(name.split()) != 1:
                raise DataError(f"{path} line {number}: expected one image id, got {name!r}")
            names.append(name)
        if not names:
            raise DataError(f"split file {path} lists no image ids")
        duplicates = [n for n, count in Counter(names).items() if count > 1]
        if duplicates:
            raise DataError(
                f"split file {path} repeats {len(duplicates)} id(s): {_first_few(duplicates)}"
            )
        present = _stems(self.image_dir, ".jpg")
        missing = [n for n in names if n not in present]
        if missing:
            raise DataError(
                f"split file {path} names {len(missing)} image(s) missing from "
                f"{self.image_dir}: {_first_few(missing)}"
            )
        return names


# --------------------------------------------------------------------------------------------
# Reading files


def read_rgb(path: Path) -> Image.Image:
    """Fully decoded RGB image; grayscale/CMYK/palette are converted, broken files are DataError."""
    try:
        with Image.open(path) as img:
            img.load()  # forces the full decode, so truncated files fail here, not in a worker
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


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


def check_same_size(mask_hw: tuple[int, int], image_wh: tuple[int, int], mask: Path, image: Path):
    if (mask_hw[1], mask_hw[0]) != tuple(image_wh):
        raise DataError(
            f"mask {mask} is {mask_hw[1]}x{mask_hw[0]} but image {image} is "
            f"{image_wh[0]}x{image_wh[1]} (width x height)"
        )


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= IGNORE_INDEX:
        raise ConfigError(f"num_classes must be in 2..{IGNORE_INDEX}, got {num_classes}")


# --------------------------------------------------------------------------------------------
# Image-level labels with a JSON cache


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _scan_labels(image: Path, mask: Path, num_classes: int) -> list[int]:
    """Classes 1..C-1 present in ``mask``, after the cheap consistency checks."""
    values = read_mask(mask)
    check_same_size(values.shape, image_size(image), mask, image)
    counts = check_mask_values(values, num_classes, mask)
    return [c for c in range(1, num_classes) if counts[c]]


def _entry_is_current(entry: Any, stamps: dict[str, list[int]], num_classes: int) -> bool:
    """A cache entry is reused only if both files are unchanged and its labels are sane."""
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in stamps.items()):
        return False
    labels = entry.get("labels")
    return isinstance(labels, list) and all(
        type(c) is int and 1 <= c < num_classes for c in labels
    )


def label_cache_path(cache_dir: Path, root: Path, split: str, num_classes: int) -> Path:
    key = f"{Path(root).resolve()}|{split}|{num_classes}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"labels-{split}-{digest}.json"


def _load_cache(path: Path | None, header: dict[str, Any]) -> dict[str, Any]:
    """Cached entries, or {} when absent, unreadable or written for another tree/version."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is only a cache: rebuild it
    if not isinstance(data, dict) or {k: data.get(k) for k in header} != header:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def write_json_atomic(path: Path, payload: Any) -> None:
    """Readers never see a half-written file: write a sibling temp file, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def image_labels(
    layout: VOCLayout,
    split: str,
    num_classes: int,
    cache_dir: Path | None = None,
    *,
    drop_empty: bool = True,
) -> dict[str, np.ndarray]:
    """Image-level labels (float32 0/1, length C-1, no background) derived from the masks.

    One pass over the masks also checks their mode, size (against the JPEG header) and
    values. Results are cached as JSON in ``cache_dir``, one entry per id with the mask's and
    image's size + mtime, so editing either file re-scans just that id. Ids whose mask holds no
    foreground class are dropped with a warning when ``drop_empty`` (training needs a label).
    """
    _check_num_classes(num_classes)
    names = layout.read_split(split)
    mask_dir = layout.require_mask_dir()
    present = _stems(mask_dir, ".png")
    missing = [n for n in names if n not in present]
    if missing:
        raise DataError(
            f"{len(missing)} id(s) of split '{split}' have no mask in {mask_dir}: "
            f"{_first_few(missing)}"
        )

    header = {
        "version": LABEL_CACHE_VERSION,
        "root": str(layout.root.resolve()),
        "split": split,
        "num_classes": num_classes,
        "mask_dir": mask_dir.name,
    }
    cache_path = label_cache_path(cache_dir, layout.root, split, num_classes) if cache_dir else None
    cached = _load_cache(cache_path, header)

    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        image, mask = layout.image_path(name), mask_dir / f"{name}.png"
        stamps = {"mask": _stamp(mask), "image": _stamp(image)}
        old = cached.get(name)
        if _entry_is_current(old, stamps, num_classes):
            entries[name] = old
        else:
            entries[name] = {"labels": _scan_labels(image, mask, num_classes), **stamps}
    if cache_path is not None and entries != cached:
        try:
            write_json_atomic(cache_path, {**header, "entries": entries})
        except OSError as exc:  # a cache that cannot be written only costs time
            warnings.warn(f"could not write label cache {cache_path}: {exc}", stacklevel=2)

    labels: dict[str, np.ndarray] = {}
    empty = []
    for name in names:
        classes = entries[name]["labels"]
        if not classes and drop_empty:
            empty.append(name)
            continue
        vector = np.zeros(num_classes - 1, dtype=np.float32)
        vector[np.asarray(classes, dtype=np.int64) - 1] = 1.0
        labels[name] = vector
    if empty:
        warnings.warn(
            f"split '{split}' of {layout.root}: {len(empty)} image(s) with no foreground class "
            f"left out of training: {_first_few(empty)}",
            stacklevel=2,
        )
    if not labels:
        raise DataError(f"split '{split}' of {layout.root} has no image with a foreground class")
    return labels


# --------------------------------------------------------------------------------------------
# Training augmentation (spec 4.2)


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


class VOCTrainDataset(Dataset):
    """ToCo training samples: main view, second global view, local view, labels, img_box.

    Args:
        root: VOC-style root folder.
        split: split name (``ImageSets/Segmentation/<split>.txt``).
        num_classes: C, background included.
        crop_size: S, side of every view.
        scale_range: range of the random rescale factor.
        cache_dir: where the JSON label cache lives (None: no cache).
        align_local_flip: True (fix of bug B2) keeps ``image`` and ``local_view`` pixel-aligned
            with the crop that img_box and the CAMs refer to; False gives each its own random
            flip as in the reference.
        photometric: False disables colour jitter, grayscale, blur and solarize (for tests and
            ablations); the geometric steps are unchanged.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int = 21,
        crop_size: int = 448,
        scale_range: tuple[float, float] = (0.5, 2.0),
        cache_dir: str | Path | None = None,
        align_local_flip: bool = True,
        photometric: bool = True,
    ):
        if crop_size < 1:
            raise ConfigError(f"crop_size must be positive, got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ConfigError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.layout = VOCLayout(Path(root))
        self.labels = image_labels(
            self.layout, split, num_classes, Path(cache_dir) if cache_dir else None
        )
        self.names = list(self.labels)
        self.split, self.num_classes = split, num_classes
        self.crop_size, self.scale_range = crop_size, tuple(scale_range)
        flip_views = not align_local_flip
        self.local_view = PhotometricView(flip_views, blur_p=0.5, solarize_p=0.0,
                                          photometric=photometric)  # fmt: skip
        self.main_view = PhotometricView(flip_views, blur_p=1.0, solarize_p=0.0,
                                         photometric=photometric)  # fmt: skip
        self.resized_crop = T.RandomResizedCrop(
            crop_size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC
        )
        self.second_view = PhotometricView(True, blur_p=0.1, solarize_p=0.2,
                                           photometric=photometric)  # fmt: skip

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        original = read_rgb(self.layout.image_path(name))
        scaled = random_hflip(random_scale(original, self.scale_range))
        crop, box = random_crop_with_box(np.asarray(scaled), self.crop_size)
        crop_img = Image.fromarray(crop)
        local = self.local_view(crop_img)
        main = self.main_view(crop_img)
        view2 = self.second_view(self.resized_crop(original))
        return {
            "name": name,
            "image": to_uint8_chw(main),
            "view2": to_uint8_chw(view2),
            "local_view": to_uint8_chw(local),
            "cls_label": torch.from_numpy(self.labels[name].copy()),
            "img_box": torch.tensor(box, dtype=torch.int64),
        }


class VOCEvalDataset(Dataset):
    """Original-size images with their masks (when the split has them) and image labels.

    With ``with_masks=False`` (e.g. the VOC test split, bug B18) no mask is read and
    ``cls_label`` is all zeros. Eval images keep empty-label images: they are valid GT.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int = 21,
        cache_dir: str | Path | None = None,
        with_masks: bool = True,
    ):
        _check_num_classes(num_classes)
        self.layout = VOCLayout(Path(root))
        self.split, self.num_classes, self.with_masks = split, num_classes, with_masks
        if with_masks:
            self.labels = image_labels(
                self.layout, split, num_classes, Path(cache_dir) if cache_dir else None,
                drop_empty=False,
            )  # fmt: skip
            self.names = list(self.labels)
        else:
            self.names = self.layout.read_split(split)
            self.labels = {n: np.zeros(num_classes - 1, dtype=np.float32) for n in self.names}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        image_path = self.layout.image_path(name)
        image = read_rgb(image_path)
        sample: dict[str, Any] = {
            "name": name,
            "image": to_uint8_chw(image),
            "cls_label": torch.from_numpy(self.labels[name].copy()),
        }
        if self.with_masks:
            # Re-checked here because files may change after the label cache was built.
            mask_path = self.layout.mask_path(name)
            mask = read_mask(mask_path)
            check_same_size(mask.shape, image.size, mask_path, image_path)
            check_mask_values(mask, self.num_classes, mask_path)
            sample["mask"] = torch.from_numpy(mask.astype(np.int64))
        return sample
