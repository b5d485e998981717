"""COCO instances JSON → per-image image-level labels and semantic masks (pycocotools).

Classes: 81 = background + the 80 COCO categories, mapped to contiguous ids 1..80 in the
standard order of their category ids (1 person, 2 bicycle, ..., 90 toothbrush), as in ToCo's
``class_list``.

Mask rule (``OVERLAP_RULE``), for every pixel of an image:

- covered by one or more non-crowd instances: the class of the SMALLEST of them (fewest mask
  pixels; equal areas: the lowest annotation id), i.e. instances are painted in order of
  decreasing area so smaller objects stay on top;
- otherwise covered by a crowd region (``iscrowd=1``): 255 (ignore);
- otherwise: 0 (background).

Image-level labels are the categories of ALL the image's annotations, crowd ones included (a
crowd of people is people in the image). Polygons with fewer than 3 points cover no pixel.
"""

from __future__ import annotations

import contextlib
import gc
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping, NoReturn, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from datasets.files import IGNORE_INDEX, first_few, image_size
from toco.errors import DataError

COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip
COCO_CLASSES: tuple[str, ...] = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
CATEGORY_TO_CLASS: dict[int, int] = {cid: i + 1 for i, cid in enumerate(COCO_CATEGORY_IDS)}
OVERLAP_RULE = "smallest-instance-on-top;crowd-255-below-instances;v1"


@dataclass(frozen=True)
class CocoImage:
    """One image entry and the annotations that refer to it (fields we use only)."""

    image_id: int
    stem: str
    height: int
    width: int
    annotations: tuple[dict[str, Any], ...]
    category_to_class: Mapping[int, int] = field(
        default_factory=lambda: CATEGORY_TO_CLASS, compare=False, repr=False
    )
    file_name: str = ""

    @property
    def labels(self) -> list[int]:
        """Sorted contiguous class ids of all annotations, crowd included."""
        return sorted({self.category_to_class[a["category_id"]] for a in self.annotations})

    @property
    def segmented(self) -> bool:
        """Every annotation has a segmentation (an image-level-only entry has none or [])."""
        return bool(self.annotations) and all(a["segmentation"] for a in self.annotations)


@dataclass(frozen=True)
class CocoIndex:
    """A validated instances file: images by stem (sorted), their common file suffix."""

    path: Path
    images: dict[str, CocoImage]
    suffix: str

    def labelled(self) -> list[str]:
        """Sorted stems of the images with at least one annotation."""
        return [s for s, image in self.images.items() if image.annotations]


def _fail(path: Path, message: str) -> NoReturn:
    raise DataError(f"annotation file {path}: {message}")


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_id(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, str) and bool(value))


def custom_categories(
    categories: Any, path: Path, class_names: Sequence[str] | None = None
) -> dict[int, int]:
    """Category id -> class id of a file with its own categories: the index of the category's
    name in ``class_names`` (background first), or without them the categories in id order."""
    if not isinstance(categories, list):
        _fail(path, "'categories' must be a list")
    names: dict[int, str] = {}
    for cat in categories:
        if not (
            isinstance(cat, dict)
            and _is_int(cat.get("id"))
            and isinstance(cat.get("name"), str)
            and cat["name"].strip()
        ):
            _fail(path, f"bad category entry {str(cat)[:80]} (needs an integer id and a name)")
        if cat["id"] in names:
            _fail(path, f"category id {cat['id']} is listed twice")
        names[cat["id"]] = cat["name"].strip()
    if class_names is None:
        return {cid: i + 1 for i, cid in enumerate(sorted(names))}
    index = {name: i for i, name in enumerate(class_names) if i > 0}
    unknown = [f"{cid} ({n!r})" for cid, n in sorted(names.items()) if n not in index]
    if unknown:
        _fail(path, f"categories not in the class list: {first_few(unknown)}")
    return {cid: index[n] for cid, n in names.items()}


def _check_categories(categories: Any, path: Path) -> None:
    """Categories must be standard COCO ones: known id, standard name (a subset is fine)."""
    if not isinstance(categories, list):
        _fail(path, "'categories' must be a list")
    for cat in categories:
        if not (isinstance(cat, dict) and _is_int(cat.get("id"))):
            _fail(path, f"bad category entry {cat!r}")
        cid, name = cat["id"], cat.get("name")
        if cid not in CATEGORY_TO_CLASS:
            _fail(path, f"category id {cid} ({name!r}) is not one of the 80 COCO categories")
        expected = COCO_CLASSES[CATEGORY_TO_CLASS[cid]]
        if name != expected:  # the id decides the class; a renamed category is suspicious
            warnings.warn(f"annotation file {path}: category id {cid} is named {name!r}; it "
                          f"is read as COCO's {expected!r}", stacklevel=4)  # fmt: skip


def _image_entry(
    entry: Any, path: Path, image_dir: Path | None, keep_folders: bool = False
) -> tuple[Any, str, int, int]:
    """(id, file name, height, width) of a valid image entry.

    A file name's folders are dropped (images live in the subset folder) unless
    ``keep_folders`` (a tagged collection's paths relative to its images/); a missing size is
    read from the image header when ``image_dir`` is given.
    """
    if not isinstance(entry, dict) or not _is_id(entry.get("id")):
        _fail(path, f"image entry without an integer or string id: {str(entry)[:80]}")
    image_id, file_name = entry["id"], entry.get("file_name")
    if not isinstance(file_name, str) or not PurePosixPath(file_name.replace("\\", "/")).name:
        _fail(path, f"image {image_id}: file_name {file_name!r} is not a file name")
    posix = PurePosixPath(file_name.replace("\\", "/"))
    file_name = str(posix) if keep_folders else posix.name
    h, w = entry.get("height"), entry.get("width")
    if h is None and w is None and image_dir is not None:
        w, h = image_size(image_dir / file_name)
    if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
        _fail(path, f"image {image_id} ({file_name}) has no valid height/width")
    return image_id, file_name, h, w


def _parse_images(
    entries: Any, path: Path, image_dir: Path | None, custom: bool = False
) -> tuple[dict[Any, dict[str, Any]], str]:
    """Image entries by id and their common suffix; ``custom`` files keep folders in the
    stem (the path without suffix) and may mix suffixes (the suffix returned is then '')."""
    if not isinstance(entries, list):
        _fail(path, "'images' must be a list")
    images: dict[Any, dict[str, Any]] = {}
    stems: dict[str, Any] = {}
    suffixes = set()
    for entry in entries:
        image_id, file_name, h, w = _image_entry(entry, path, image_dir, keep_folders=custom)
        if image_id in images:
            _fail(path, f"image id {image_id} is listed twice")
        posix = PurePosixPath(file_name)
        stem = str(posix.with_suffix("")) if custom else posix.stem
        if stem in stems:
            _fail(path, f"file name {file_name} is used by images {stems[stem]} and {image_id}")
        stems[stem] = image_id
        suffixes.add(posix.suffix)
        images[image_id] = {
            "stem": stem,
            "height": h,
            "width": w,
            "annotations": [],
            "file_name": file_name,
        }
    if custom:
        return images, ""
    if len(suffixes) > 1:
        _fail(path, f"images mix file suffixes {sorted(suffixes)}")
    return images, (suffixes.pop() if suffixes else ".jpg")


def _attach_annotations(
    entries: Any,
    images: dict[Any, dict[str, Any]],
    path: Path,
    category_to_class: Mapping[int, int] = CATEGORY_TO_CLASS,
    custom: bool = False,
) -> None:
    """Annotations onto their images; ``custom`` files may leave out the segmentation (an
    image-level tag)."""
    if not isinstance(entries, list):
        _fail(path, "'annotations' must be a list")
    unknown_images = []
    for ann in entries:
        if not (isinstance(ann, dict) and _is_int(ann.get("id"))):
            _fail(path, f"bad annotation entry {str(ann)[:80]}")
        aid, cid, crowd = ann["id"], ann.get("category_id"), ann.get("iscrowd", 0)
        if cid not in category_to_class:
            what = "a category of the file" if custom else "one of the 80 COCO categories"
            _fail(path, f"annotation {aid} has category id {cid!r}, not {what}")
        if crowd not in (0, 1):
            _fail(path, f"annotation {aid} has iscrowd {crowd!r}")
        if "segmentation" not in ann and not custom:
            _fail(path, f"annotation {aid} has no segmentation")
        image = images.get(ann.get("image_id"))
        if image is None:
            unknown_images.append(str(ann.get("image_id")))
            continue
        image["annotations"].append({"id": aid, "category_id": cid, "iscrowd": int(crowd),
                                     "segmentation": ann.get("segmentation")})  # fmt: skip
    if unknown_images:
        _fail(path, f"{len(unknown_images)} annotation(s) refer to unknown image ids: "
                    f"{first_few(unknown_images)}")  # fmt: skip


def parse_instances(
    data: Any,
    path: Path,
    image_dir: Path | None = None,
    *,
    custom: bool = False,
    class_names: Sequence[str] | None = None,
) -> CocoIndex:
    """Validate a loaded instances JSON and index it by image stem (``image_dir``: where its
    images are, to read sizes the JSON omits).

    ``custom``: the file brings its own categories (mapped by ``custom_categories``) and its
    file names are paths relative to ``image_dir``, sub-folders kept; otherwise the
    categories must be COCO's 80.
    """
    if not isinstance(data, dict):
        _fail(path, "expected a JSON object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            _fail(path, f"missing '{key}'")
    if custom:
        mapping = custom_categories(data["categories"], path, class_names)
    else:
        _check_categories(data["categories"], path)
        mapping = CATEGORY_TO_CLASS
    images, suffix = _parse_images(data["images"], path, image_dir, custom)
    _attach_annotations(data["annotations"], images, path, mapping, custom)
    by_stem = {
        entry["stem"]: CocoImage(
            image_id,
            entry["stem"],
            entry["height"],
            entry["width"],
            tuple(entry["annotations"]),
            mapping,
            entry["file_name"],
        )
        for image_id, entry in images.items()
    }
    return CocoIndex(Path(path), dict(sorted(by_stem.items())), suffix)


def instances_from_bytes(
    raw: bytes, path: Path, image_dir: Path | None = None, **custom: Any
) -> CocoIndex:
    """Parse and validate the bytes of ``instances_*.json`` read from ``path`` (``custom``:
    the keyword arguments of ``parse_instances``)."""
    with _collector_paused():
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise DataError(f"cannot read annotation file {path}: {exc}") from exc
        return parse_instances(data, Path(path), image_dir, **custom)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while the annotations become objects: COCO train's 30M
    numbers and 600k dicts made it run again and again over data that holds no cycle (14.8 s
    to parse and index with it on, 8.9 s off, on a 2-core EPYC)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_instances(path: Path, image_dir: Path | None = None, **custom: Any) -> CocoIndex:
    """Read and validate ``instances_*.json``; any problem is a DataError naming the file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"annotation file {path} not found") from None
    except OSError as exc:
        raise DataError(f"cannot read annotation file {path}: {exc}") from exc
    return instances_from_bytes(raw, Path(path), image_dir, **custom)


# --------------------------------------------------------------------------------------------
# Rasterisation


_COORDINATE_TYPES = frozenset({int, float})  # what JSON numbers parse to (bool is no number)


def annotation_rle(ann: dict[str, Any], h: int, w: int, where: str) -> dict[str, Any] | None:
    """The annotation's region as a compressed RLE, or None when it covers no pixel.

    Polygons (a list of [x1, y1, x2, y2, ...]), compressed RLE (``counts`` a string) and
    uncompressed RLE (``counts`` a list, used for crowd regions) are accepted.
    """
    segm, aid = ann["segmentation"], ann["id"]
    if segm is None:  # an image-level tag of a custom file: no region
        return None
    if isinstance(segm, list):
        polygons = []
        for poly in segm:
            # the set of the values' types, not an isinstance call per value: COCO train
            # holds 30M coordinates
            if not (isinstance(poly, list) and len(poly) % 2 == 0
                    and _COORDINATE_TYPES.issuperset(map(type, poly))):  # fmt: skip
                raise DataError(f"{where}: annotation {aid} has a malformed polygon")
            if len(poly) >= 6:  # fewer than 3 points: no area (and pycocotools would read
                polygons.append(poly)  # 4 numbers as a box); it converts them to doubles
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [h, w]:
            raise DataError(
                f"{where}: annotation {aid} has RLE size {segm['size']} but the image is "
                f"{h}x{w} (height x width)"
            )
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise DataError(f"{where}: annotation {aid} has RLE counts not summing to {h * w}")
            return mask_utils.frPyObjects(segm, h, w)
        if isinstance(counts, (str, bytes)):
            encoded = counts.encode() if isinstance(counts, str) else counts
            return {"size": [h, w], "counts": encoded}
    raise DataError(f"{where}: annotation {aid} has an unsupported segmentation")


def rasterize(image: CocoImage, where: str = "annotations") -> np.ndarray:
    """The image's semantic mask (uint8 H x W, 0..80 and 255) under ``OVERLAP_RULE``."""
    h, w = image.height, image.width
    mask = np.zeros((h, w), dtype=np.uint8)
    shapes = [(ann, rle) for ann in image.annotations
              if (rle := annotation_rle(ann, h, w, where)) is not None]  # fmt: skip
    if not shapes:
        return mask
    regions, areas = _decode_all(shapes, where)  # one pycocotools call: a third faster
    instances = []
    for k, (ann, _) in enumerate(shapes):
        if ann["iscrowd"]:
            mask[regions[:, :, k]] = IGNORE_INDEX
        else:
            instances.append((int(areas[k]), ann["id"], k, ann["category_id"]))
    for _, _, k, category in sorted(instances, key=lambda t: (-t[0], -t[1])):
        mask[regions[:, :, k]] = image.category_to_class[category]
    return mask


def _decode_all(
    shapes: list[tuple[dict[str, Any], dict[str, Any]]], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x N bool regions, N pixel counts) of the RLEs; a corrupt one is named."""
    rles = [rle for _, rle in shapes]
    with warnings.catch_warnings():  # pycocotools 2.0.x vs numpy 2 'copy' keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return mask_utils.decode(rles).astype(bool), mask_utils.area(rles)
        except Exception:  # pycocotools raises bare exceptions on corrupt RLE strings
            for ann, rle in shapes:  # name the one that fails
                try:
                    mask_utils.decode(rle)
                except Exception as exc:
                    raise DataError(
                        f"{where}: annotation {ann['id']} cannot be decoded: {exc}"
                    ) from exc
            raise
