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
        ImageSpec(
            "img_e", boxes_mask(44, 52, [(3, 2, 10, 2, 10), (12, 20, 40, 20, 50)]), mask_mode="L"
        ),  # fmt: skip
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


# --------------------------------------------------------------------------------------------
# PASCAL VOC annotation files


def write_voc_xml(
    path: Path, hw: tuple[int, int], objects: Sequence[str], difficult: Sequence[bool] = ()
) -> None:
    """A VOC ``Annotations/<id>.xml`` with one <object> per name (person parts included)."""
    parts = []
    for i, name in enumerate(objects):
        flag = int(difficult[i]) if i < len(difficult) else 0
        part = "<part><name>head</name></part>" if name == "person" else ""
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0"
            f"</truncated><difficult>{flag}</difficult><bndbox><xmin>1</xmin><ymin>1"
            f"</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>{part}</object>"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><folder>VOC2012</folder><filename>{path.stem}.jpg</filename>"
        f"<size><width>{hw[1]}</width><height>{hw[0]}</height><depth>3</depth>"
        f"</size>{''.join(parts)}</annotation>"
    )


# --------------------------------------------------------------------------------------------
# MS COCO trees: instances JSON written by hand plus JPEGs


def coco_rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """Polygon of the pixel rectangle [y0:y1, x0:x1] (pycocotools fills it exactly)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_mask(hw: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(hw, dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE (counts as a JSON string), encoded by pycocotools."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (counts a list of run lengths, column-major, zeros first)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = int(pixel), 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


COCO_TEST_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 5, "name": "airplane", "supercategory": "vehicle"},
    {"id": 9, "name": "boat", "supercategory": "vehicle"},
    {"id": 13, "name": "stop sign", "supercategory": "outdoor"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 24, "name": "zebra", "supercategory": "animal"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
]


def coco_image(image_id: int, subset: str, hw: tuple[int, int]) -> dict:
    return {
        "id": image_id,
        "file_name": f"COCO_{subset}_{image_id:012d}.jpg",
        "height": hw[0],
        "width": hw[1],
    }


def coco_ann(ann_id: int, image_id: int, category: int, segmentation, crowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "iscrowd": crowd,
        "segmentation": segmentation,
        "area": 0.0,
        "bbox": [0, 0, 1, 1],
    }


def standard_coco_instances() -> dict[str, dict]:
    """Instances JSON content per subset of the standard COCO test tree.

    train2014:
      1 (40x60): person polygon [5:25, 10:30] (area 400); dog compressed RLE [15:35, 20:50]
        (600); crowd person uncompressed RLE [0:40, 45:60].
      2 (30x30, grayscale JPEG): zebra triangle x + y <= 6; toothbrush with a 2-point polygon
        (no pixel); stop sign as two polygons [0:10, 20:30] and [20:30, 20:30].
      3 (20x20): no annotation (left out).
      4 (24x32): only a crowd car region [4:20, 8:24].
    val2014:
      42 (36x48): airplane [6:30, 4:44] (ann 401) and boat [6:30, 8:48] (ann 402): equal areas.
      73 (32x32): person [0:32, 0:16].
      74 (16x16): no annotation (left out).
    """
    train_images = [
        coco_image(1, "train2014", (40, 60)),
        coco_image(2, "train2014", (30, 30)),
        coco_image(3, "train2014", (20, 20)),
        coco_image(4, "train2014", (24, 32)),
    ]
    train_anns = [
        coco_ann(101, 1, 1, [coco_rect(10, 5, 30, 25)]),
        coco_ann(102, 1, 18, compressed_rle(rect_mask((40, 60), 15, 35, 20, 50))),
        coco_ann(103, 1, 1, uncompressed_rle(rect_mask((40, 60), 0, 40, 45, 60)), crowd=1),
        coco_ann(201, 2, 24, [[0, 0, 8, 0, 0, 8]]),
        coco_ann(202, 2, 90, [[20, 20, 25, 25]]),
        coco_ann(203, 2, 13, [coco_rect(20, 0, 30, 10), coco_rect(20, 20, 30, 30)]),
        coco_ann(301, 4, 3, uncompressed_rle(rect_mask((24, 32), 4, 20, 8, 24)), crowd=1),
    ]
    val_images = [
        coco_image(42, "val2014", (36, 48)),
        coco_image(73, "val2014", (32, 32)),
        coco_image(74, "val2014", (16, 16)),
    ]
    val_anns = [
        coco_ann(401, 42, 5, [coco_rect(4, 6, 44, 30)]),
        coco_ann(402, 42, 9, [coco_rect(8, 6, 48, 30)]),
        coco_ann(501, 73, 1, [coco_rect(0, 0, 16, 32)]),
    ]
    info = {"description": "toco test tree"}
    return {  # fresh dicts on every call: tests edit them
        "train2014": {
            "info": info,
            "images": train_images,
            "annotations": train_anns,
            "categories": [dict(c) for c in COCO_TEST_CATEGORIES],
        },
        "val2014": {
            "info": info,
            "images": val_images,
            "annotations": val_anns,
            "categories": [dict(c) for c in COCO_TEST_CATEGORIES],
        },
    }


GRAYSCALE_COCO_IMAGES = {"COCO_train2014_000000000002"}


def expected_coco_masks() -> dict[str, np.ndarray]:
    """The exact masks of ``standard_coco_instances`` under the documented overlap rule."""
    m1 = np.zeros((40, 60), dtype=np.uint8)
    m1[0:40, 45:60] = 255  # crowd
    m1[15:35, 20:50] = 17  # dog over the crowd
    m1[5:25, 10:30] = 1  # the smaller person on top of the dog
    m2 = np.zeros((30, 30), dtype=np.uint8)
    yy, xx = np.mgrid[0:30, 0:30]
    m2[xx + yy <= 6] = 23  # zebra triangle
    m2[0:10, 20:30] = 12
    m2[20:30, 20:30] = 12
    m4 = np.zeros((24, 32), dtype=np.uint8)
    m4[4:20, 8:24] = 255
    m42 = np.zeros((36, 48), dtype=np.uint8)
    m42[6:30, 8:48] = 9
    m42[6:30, 4:44] = 5  # equal areas: the lower annotation id (airplane) wins
    m73 = np.zeros((32, 32), dtype=np.uint8)
    m73[0:32, 0:16] = 1
    return {
        "COCO_train2014_000000000001": m1,
        "COCO_train2014_000000000002": m2,
        "COCO_train2014_000000000004": m4,
        "COCO_val2014_000000000042": m42,
        "COCO_val2014_000000000073": m73,
    }


EXPECTED_COCO_LABELS = {
    "COCO_train2014_000000000001": [1, 17],
    "COCO_train2014_000000000002": [12, 23, 80],
    "COCO_train2014_000000000004": [3],
    "COCO_val2014_000000000042": [5, 9],
    "COCO_val2014_000000000073": [1],
}


def write_coco_json(root: Path, subset: str, content: dict) -> Path:
    import json

    path = Path(root) / "annotations" / f"instances_{subset}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def make_coco_tree(
    root: Path,
    instances: dict[str, dict] | None = None,
    grayscale: set[str] = GRAYSCALE_COCO_IMAGES,
) -> Path:
    """A COCO 2014 root: ``<subset>/<file_name>`` JPEGs and ``annotations/instances_*.json``."""
    root = Path(root)
    for subset, content in (instances or standard_coco_instances()).items():
        (root / subset).mkdir(parents=True, exist_ok=True)
        for image in content["images"]:
            path = root / subset / image["file_name"]
            mode = "L" if path.stem in grayscale else "RGB"
            write_jpeg(path, (image["height"], image["width"]), mode)
        write_coco_json(root, subset, content)
    return root


# --------------------------------------------------------------------------------------------
# Tagged image collections (datasets/tags.py)


def write_image(path: Path, hw: tuple[int, int], mode: str = "RGB") -> None:
    """An image in the format its suffix names (JPEG quality 95; PNG, WebP, BMP, TIFF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image_pixels(*hw)).convert(mode)
    if path.suffix.lower() in (".jpg", ".jpeg", ".webp"):
        img.save(path, quality=95)
    else:
        img.save(path)


def make_tags_tree(
    root: Path,
    images: dict[str, tuple[int, int]],
    labels: dict[str, Sequence[str]],
    *,
    fmt: str = "csv",
    classes: Sequence[str] | None = None,
    masks: dict[str, np.ndarray] | None = None,
    splits: dict[str, Sequence[str]] | None = None,
) -> Path:
    """A tagged root: ``images/<path>`` of the given (h, w), a labels file in ``fmt`` ('csv' or
    'jsonl') listing ``labels`` (path -> class names), optional classes.txt, masks (path ->
    index mask, written at masks/<path without suffix>.png) and splits/<name>.txt."""
    import json

    root = Path(root)
    for relative, hw in images.items():
        write_image(root / "images" / relative, hw)
    if fmt == "csv":
        lines = ["image,labels"] + [f"{p},{';'.join(n)}" for p, n in labels.items()]
        (root / "labels.csv").write_text("\n".join(lines) + "\n")
    else:
        (root / "labels.jsonl").write_text(
            "".join(json.dumps({"image": p, "labels": list(n)}) + "\n" for p, n in labels.items())
        )
    if classes is not None:
        (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    for relative, mask in (masks or {}).items():
        path = root / "masks" / Path(relative).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mask_png(path, mask)
    for split, paths in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{p}\n" for p in paths))
    return root


def tags_form_of_voc(
    voc_root: Path,
    root: Path,
    labels: dict[str, list[int]],
    splits: Sequence[str] = ("train", "val"),
) -> Path:
    """The CSV form of a VOC-style tree: same images (as images/<id>.jpg), masks and splits,
    ``labels`` (id -> VOC class ids) in labels.csv, VOC's class list in classes.txt."""
    import shutil

    from datasets.voc import VOC_CLASSES

    root = Path(root)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = ["image,labels"]
    for image in sorted((voc_root / "JPEGImages").glob("*.jpg")):
        shutil.copy(image, root / "images" / image.name)
        mask = voc_root / "SegmentationClass" / f"{image.stem}.png"
        shutil.copy(mask, root / "masks" / mask.name)
        lines.append(f"{image.name},{';'.join(VOC_CLASSES[c] for c in labels[image.stem])}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in VOC_CLASSES[1:]))
    (root / "splits").mkdir()
    for split in splits:
        ids = (voc_root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        (root / "splits" / f"{split}.txt").write_text("".join(f"{i}.jpg\n" for i in ids))
    return root
