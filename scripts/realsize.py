"""Generated trees in the real formats and at real sizes, for the scale benchmarks.

`write_voc_tree` writes a VOC 2012 tree (JPEGImages, SegmentationClass palette PNGs,
Annotations XML, ImageSets/Segmentation/<split>.txt); `write_coco_tree` a COCO 2014 root
(train2014/, val2014/, annotations/instances_*.json with polygon instances). The pictures are
photo-like (smooth colour fields plus per-pixel grain) so that JPEG decoding costs about what a
photo of the same size does; they carry no learnable signal. Everything is drawn from
`numpy.random.default_rng((seed, index))`: the same arguments give the same bytes on the same
Pillow/libjpeg. Nothing here is used by training; these trees are never committed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from datasets.coco_annotations import COCO_CATEGORY_IDS, COCO_CLASSES
from datasets.files import palette_png_bytes, write_bytes_atomic
from datasets.voc import VOC_CLASSES

VOC_HW = (375, 500)  # the most common VOC 2012 image size (height, width)
COCO_HW = (480, 640)  # the most common COCO 2014 image size
JPEG_QUALITY = 90
# COCO train2014: 82,783 images, 604,907 instances (7.3 per image); polygons of ~24 points.
COCO_TRAIN_IMAGES, COCO_VAL_IMAGES, VOC_TRAIN_AUG_IMAGES = 82_783, 40_504, 10_582
COCO_VAL_EVAL_IMAGES = 40_137  # val2014 images with at least one labelled instance


def photo_like(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: a bicubic-smooth colour field plus grain (JPEG-costly like a photo)."""
    h, w = hw
    coarse = rng.integers(0, 256, size=(max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32
    )
    grain = rng.normal(0.0, 10.0, size=(h, w, 3)).astype(np.float32)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def object_boxes(
    rng: np.random.Generator, hw: tuple[int, int], count: int
) -> list[tuple[int, int, int, int]]:
    """`count` random boxes (y0, y1, x0, x1), each 15-50% of the sides, inside the image."""
    h, w = hw
    boxes = []
    for _ in range(count):
        bh, bw = (max(2, int(rng.uniform(0.15, 0.5) * s)) for s in (h, w))
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        boxes.append((y0, y0 + bh, x0, x0 + bw))
    return boxes


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def voc_sample(seed: int, index: int, hw: tuple[int, int]) -> tuple[bytes, bytes, str]:
    """JPEG bytes, palette-PNG mask bytes and annotation XML of one generated VOC image."""
    rng = np.random.default_rng((seed, index))
    mask = np.zeros(hw, dtype=np.uint8)
    classes = [int(c) for c in rng.integers(1, len(VOC_CLASSES), size=int(rng.integers(1, 4)))]
    for cls, (y0, y1, x0, x1) in zip(classes, object_boxes(rng, hw, len(classes))):
        mask[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = 255  # VOC's ignore ring
        mask[y0:y1, x0:x1] = cls
    objects = "".join(f"<object><name>{VOC_CLASSES[c]}</name></object>" for c in classes)
    xml = f"<annotation><filename>{index}</filename>{objects}</annotation>"
    return jpeg_bytes(photo_like(rng, hw)), palette_png_bytes(mask), xml


def _each(count: int, progress: Callable[[int], None] | None) -> Iterable[int]:
    for i in range(count):
        yield i
        if progress is not None and (i + 1) % 1000 == 0:
            progress(i + 1)


def write_voc_tree(
    root: Path,
    count: int,
    hw: tuple[int, int] = VOC_HW,
    seed: int = 0,
    splits: Mapping[str, int | None] | Sequence[str] = ("train",),
    progress: Callable[[int], None] | None = None,
) -> Path:
    """A VOC 2012 tree of `count` images `2007_NNNNNN`; `splits` maps each split to how many
    of them it lists, the first ones (None: all; a plain list of names: all in each)."""
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"2007_{i:06d}" for i in range(count)]
    for i in _each(count, progress):
        jpeg, png, xml = voc_sample(seed, i, hw)
        (root / "JPEGImages" / f"{names[i]}.jpg").write_bytes(jpeg)
        (root / "SegmentationClass" / f"{names[i]}.png").write_bytes(png)
        (root / "Annotations" / f"{names[i]}.xml").write_text(xml)
    sizes = splits if isinstance(splits, Mapping) else dict.fromkeys(splits)
    for split, size in sizes.items():  # written last: a tree without them is unfinished
        write_bytes_atomic(
            root / "ImageSets" / "Segmentation" / f"{split}.txt",
            ("\n".join(names[:size]) + "\n").encode(),
        )
    return root


def polygon(rng: np.random.Generator, box: tuple[int, int, int, int], points: int) -> list[float]:
    """A star-shaped polygon of `points` vertices inside box (y0, y1, x0, x1), COCO's x,y list."""
    y0, y1, x0, x1 = box
    cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    radius = rng.uniform(0.5, 1.0, points)
    xs, ys = cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def coco_instances(
    subset: str,
    count: int,
    hw: tuple[int, int],
    seed: int,
    per_image: float = 7.3,
    points: int = 24,
) -> dict:
    """Instances JSON content: `count` images, ~`per_image` polygon instances each (1 crowd-free
    instance at least, so every image is labelled)."""
    rng = np.random.default_rng((seed, 1 << 20))
    images, annotations = [], []
    for i in range(count):
        image_id = i + 1
        images.append(
            {
                "id": image_id,
                "file_name": f"COCO_{subset}_{image_id:012d}.jpg",
                "height": hw[0],
                "width": hw[1],
                "license": 1,
                "coco_url": "",
                "date_captured": "2014-01-01 00:00:00",
                "flickr_url": "",
            }
        )
        n = max(1, int(rng.poisson(per_image)))
        for box in object_boxes(rng, hw, n):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(COCO_CATEGORY_IDS)),
                    "iscrowd": 0,
                    "segmentation": [polygon(rng, box, points)],
                    "area": float((box[1] - box[0]) * (box[3] - box[2])),
                    "bbox": [box[2], box[0], box[3] - box[2], box[1] - box[0]],
                }
            )
    categories = [
        {"id": c, "name": name, "supercategory": ""}
        for c, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])
    ]
    return {
        "info": {"description": "generated"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_coco_tree(
    root: Path,
    counts: dict[str, int],
    hw: tuple[int, int] = COCO_HW,
    seed: int = 0,
    per_image: float = 7.3,
    points: int = 24,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """A COCO 2014 root with counts[subset] images per subset ('train2014', 'val2014')."""
    root = Path(root)
    for subset, count in counts.items():
        content = coco_instances(subset, count, hw, seed, per_image, points)
        (root / subset).mkdir(parents=True, exist_ok=True)
        for i in _each(count, progress):
            rng = np.random.default_rng((seed, i))
            path = root / subset / content["images"][i]["file_name"]
            path.write_bytes(jpeg_bytes(photo_like(rng, hw)))
        # the annotation file last: a root without it is visibly unfinished
        write_bytes_atomic(
            root / "annotations" / f"instances_{subset}.json",
            json.dumps(content, separators=(",", ":")).encode(),
        )
    return root
