"""PASCAL-VOC-style segmentation datasets: ToCo training views and evaluation samples.

Both datasets read any ``SegLayout`` (``VOCLayout`` for a VOC tree, ``COCOLayout`` for a
prepared COCO root); given a plain folder they read it as a VOC tree. Images travel as uint8 CHW
tensors (the model normalises), masks as int64 (H, W) tensors, 255 = ignore.

The layout, file readers, label derivation and augmentation live in ``datasets.layout``,
``datasets.files``, ``datasets.labels`` and ``datasets.transforms``; their public names are
re-exported here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset

from datasets.files import (
    IGNORE_INDEX,
    check_mask_values,
    check_same_size,
    image_size,
    read_mask,
    read_rgb,
    voc_palette,
    write_json_atomic,
)
from datasets.labels import (
    annotation_file_labels,
    check_num_classes,
    image_labels,
    label_cache_path,
    scan_mask,
)
from datasets.layout import SegLayout, VOCLayout
from datasets.transforms import (
    PhotometricView,
    random_crop_with_box,
    random_hflip,
    random_scale,
    seed_worker,
    to_uint8_chw,
)
from toco.errors import ConfigError, DataError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class BadImageWarning(UserWarning):
    """A training image could not be read and was replaced by another (``skip_bad_images``)."""


def as_layout(root: str | Path | SegLayout) -> SegLayout:
    """A layout as given, or a folder read as a VOC tree."""
    return root if isinstance(root, SegLayout) else VOCLayout(Path(root))


def default_class_names(num_classes: int) -> tuple[str, ...] | None:
    """VOC's names for 21 classes (so Annotations/*.xml can be read), else unknown."""
    return VOC_CLASSES if num_classes == len(VOC_CLASSES) else None


class VOCTrainDataset(Dataset):
    """ToCo training samples: main view, second global view, local view, labels, img_box.

    Args:
        root: a VOC-style root folder or a ``SegLayout``.
        split: split name (``<split>.txt`` along the layout's split folders).
        num_classes: C, background included.
        crop_size: S, side of every view.
        scale_range: range of the random rescale factor.
        cache_dir: where the JSON label cache lives (None: no cache).
        align_local_flip: True (fix of bug B2) keeps ``image`` and ``local_view`` pixel-aligned
            with the crop that img_box and the CAMs refer to; False gives each its own random
            flip as in the reference.
        photometric: False disables colour jitter, grayscale, blur and solarize (for tests and
            ablations); the geometric steps are unchanged.
        skip_bad_images: an image that cannot be decoded is reported once (``BadImageWarning``)
            and the next readable image is served in its place; False raises a DataError naming
            the file.
        class_names: the C names, to read labels from annotation files where a mask is missing
            (default: VOC's for 21 classes).
        label_source: "masks" or "annotations" (see ``datasets.labels.image_labels``).
    """

    def __init__(
        self,
        root: str | Path | SegLayout,
        split: str,
        num_classes: int = 21,
        crop_size: int = 448,
        scale_range: tuple[float, float] = (0.5, 2.0),
        cache_dir: str | Path | None = None,
        align_local_flip: bool = True,
        photometric: bool = True,
        skip_bad_images: bool = False,
        class_names: Sequence[str] | None = None,
        label_source: str = "masks",
    ):
        if crop_size < 1:
            raise ConfigError(f"crop_size must be positive, got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ConfigError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.layout = as_layout(root)
        self.labels = image_labels(
            self.layout, split, num_classes, Path(cache_dir) if cache_dir else None,
            require_masks=False, class_names=class_names or default_class_names(num_classes),
            source=label_source,
        )  # fmt: skip
        self.names = list(self.labels)
        self.split, self.num_classes = split, num_classes
        self.crop_size, self.scale_range = crop_size, tuple(scale_range)
        self.skip_bad_images = skip_bad_images
        self.bad_images: set[str] = set()  # per process: each worker reports its own finds
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

    def read_image(self, index: int) -> tuple[str, Image.Image]:
        """(name, RGB image) of ``index``, or with ``skip_bad_images`` of the next readable one."""
        for step in range(len(self.names)):
            name = self.names[(index + step) % len(self.names)]
            if name in self.bad_images:
                continue
            try:
                return name, self.layout.read_image(name)
            except DataError as err:
                if not self.skip_bad_images:
                    raise
                self.bad_images.add(name)
                warnings.warn(f"skipping a training image: {err}", BadImageWarning, stacklevel=2)
        raise DataError(f"no readable image left in split '{self.split}' of {self.layout.root}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, original = self.read_image(index)
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
    ``cls_label`` comes from the annotation files where they exist (all zeros otherwise). Eval
    sets keep empty-label images: they are valid ground truth.
    """

    def __init__(
        self,
        root: str | Path | SegLayout,
        split: str,
        num_classes: int = 21,
        cache_dir: str | Path | None = None,
        with_masks: bool = True,
        class_names: Sequence[str] | None = None,
        label_source: str = "masks",
    ):
        check_num_classes(num_classes)
        self.layout = as_layout(root)
        self.split, self.num_classes, self.with_masks = split, num_classes, with_masks
        names = class_names or default_class_names(num_classes)
        if with_masks:
            self.labels = image_labels(
                self.layout, split, num_classes, Path(cache_dir) if cache_dir else None,
                drop_empty=False, class_names=names, source=label_source,
            )  # fmt: skip
            self.names = list(self.labels)
        else:
            self.names = self.layout.read_split(split)
            self.labels = annotation_file_labels(self.layout, self.names, num_classes, names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        image_path = self.layout.image_path(name)
        image = self.layout.read_image(name)
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


__all__ = [
    "IGNORE_INDEX",
    "BadImageWarning",
    "PhotometricView",
    "SegLayout",
    "VOCEvalDataset",
    "VOCLayout",
    "VOCTrainDataset",
    "VOC_CLASSES",
    "check_mask_values",
    "check_same_size",
    "image_labels",
    "image_size",
    "label_cache_path",
    "random_crop_with_box",
    "random_hflip",
    "random_scale",
    "read_mask",
    "read_rgb",
    "scan_mask",
    "seed_worker",
    "to_uint8_chw",
    "voc_palette",
    "write_json_atomic",
]
