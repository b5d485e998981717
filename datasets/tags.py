"""Your own tagged images as a dataset: image-level class names per image, masks optional.

A root ``DIR`` holds::

    DIR/images/...          the images (.jpg .jpeg .png .webp .bmp .tif .tiff), sub-folders allowed
    DIR/labels.csv          header ``image,labels``: a path relative to images/, class names
                            separated by ';' (empty: no foreground class)
      or labels.jsonl       one {"image": ..., "labels": [...]} a line
      or annotations.json   COCO instances with any categories (labels from the annotations,
                            masks from their segmentations where every annotation has one)
    DIR/classes.txt         optional: one class name a line, in index order 1..K; without it
                            the sorted names of the labels (COCO: the categories in id order)
    DIR/masks/...           optional, any subset: index PNGs at the image's path with .png,
                            0 background, k the k-th class, 255 ignore
    DIR/splits/<name>.txt   optional: image paths, one a line

An image's id is its path under images/ without the suffix (``cats/001``). The labels file
defines the collection: images it does not list are left out. Default splits: the images with a
mask form ``val`` and the others ``train``; without any mask a fixed-seed ``val_fraction`` of the
images is held back as ``val``. Every problem is a DataError naming the file (and the line).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

from PIL import Image

from datasets.coco_annotations import (
    CocoIndex,
    custom_categories,
    parse_instances,
    rasterize,
)
from datasets.files import (
    display_size,
    first_few,
    palette_png_bytes,
    read_display_rgb,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from datasets.layout import SegLayout
from toco.errors import ConfigError, DataError
from toco.predict.inputs import folder_images

LABEL_FILES = ("labels.csv", "labels.jsonl", "annotations.json")
DEFAULT_VAL_FRACTION = 0.1
SPLIT_SEED = "toco-tags-v1"  # fixes which images a held-back fraction picks
MASKS_VERSION = 1


# --------------------------------------------------------------------------------------------
# Reading the collection


@dataclass(frozen=True)
class Collection:
    """A parsed root: the classes, the listed images and their labels.

    Args:
        root: the root folder.
        class_names: background first, then the K classes.
        files: id -> image path relative to images/ (posix).
        labels: id -> sorted class ids 1..K.
        labels_file: the file the labels came from.
        coco: the parsed annotations of a COCO-format root (its masks are rasterised).
    """

    root: Path
    class_names: tuple[str, ...]
    files: dict[str, str]
    labels: dict[str, list[int]]
    labels_file: Path
    coco: CocoIndex | None = field(default=None, compare=False, repr=False)
    unlisted: tuple[str, ...] = ()  # images under images/ that the labels file leaves out

    @property
    def image_dir(self) -> Path:
        return self.root / "images"


def image_id(relative: str) -> str:
    """The id of an image path relative to images/: the posix path without its suffix."""
    return str(PurePosixPath(relative.replace("\\", "/")).with_suffix(""))


def find_images(image_dir: Path) -> dict[str, str]:
    """id -> relative path of every image under ``image_dir`` (recursive, sorted; hidden files
    and folders skipped)."""
    if not image_dir.is_dir():
        raise DataError(
            f"image folder {image_dir} not found: a tagged root needs images/ and "
            f"one of {', '.join(LABEL_FILES)}"
        )
    found: dict[str, str] = {}
    for path in folder_images(image_dir):  # the files predict.py takes from a folder
        relative = path.relative_to(image_dir).as_posix()
        key = image_id(relative)
        if key in found:
            raise DataError(
                f"images {image_dir / found[key]} and {image_dir / relative} "
                "differ only by suffix: their masks would share one file"
            )
        found[key] = relative
    return dict(sorted(found.items()))


def read_class_list(path: Path) -> tuple[str, ...] | None:
    """The names of classes.txt (background first), None without the file."""
    if not path.is_file():
        return None
    names: list[str] = []
    for number, line in enumerate(_read_lines(path), start=1):
        name = line.strip()
        if not name:
            continue
        if name == "background" or ";" in name:
            why = "is class 0 and implicit" if name == "background" else "may not hold ';'"
            raise DataError(f"{path} line {number}: class name {name!r} {why}")
        if name in names:
            raise DataError(f"{path} line {number}: class {name!r} is listed twice")
        names.append(name)
    if not names:
        raise DataError(f"{path} lists no class")
    return ("background", *names)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _csv_entries(path: Path) -> Iterable[tuple[int, str, list[str]]]:
    """(line number, image, class names) of labels.csv."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if [h.strip() for h in header or []] != ["image", "labels"]:
        raise DataError(
            f"{path} line 1: expected the header 'image,labels', got {','.join(header or [])!r}"
        )
    for row in reader:
        number = reader.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise DataError(
                f"{path} line {number}: expected 2 fields (image,labels), got {len(row)}"
            )
        yield number, row[0].strip(), [n.strip() for n in row[1].split(";") if n.strip()]


def _jsonl_entries(path: Path) -> Iterable[tuple[int, str, list[str]]]:
    """(line number, image, class names) of labels.jsonl."""
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path} line {number}: not JSON: {exc}") from None
        image, labels = (
            (entry.get("image"), entry.get("labels")) if isinstance(entry, dict) else (None, None)
        )
        if not (
            isinstance(image, str)
            and isinstance(labels, list)
            and all(isinstance(n, str) for n in labels)
        ):
            raise DataError(
                f'{path} line {number}: expected {{"image": path, "labels": '
                f"[names]}}, got {line.strip()[:80]}"
            )
        yield number, image.strip(), [n.strip() for n in labels if n.strip()]


def _from_label_file(
    root: Path, path: Path, images: dict[str, str], classes: tuple[str, ...] | None
) -> Collection:
    """A CSV or JSONL collection: every line checked (missing/duplicate image, unknown class)."""
    entries = list(_csv_entries(path) if path.suffix == ".csv" else _jsonl_entries(path))
    if classes is None:
        classes = ("background", *sorted({n for _, _, names in entries for n in names}))
    index = {name: i for i, name in enumerate(classes) if i > 0}
    first_line: dict[str, int] = {}
    labels: dict[str, list[int]] = {}
    for number, image, names in entries:
        key = image_id(image)
        if key not in images or images[key] != PurePosixPath(image.replace("\\", "/")).as_posix():
            raise DataError(f"{path} line {number}: image {root / 'images' / image} does not exist")
        if key in first_line:
            raise DataError(
                f"{path} line {number}: image {image} is listed again (first on "
                f"line {first_line[key]})"
            )
        unknown = [n for n in names if n not in index]
        if unknown:
            raise DataError(
                f"{path} line {number}: unknown class {unknown[0]!r} (not in "
                f"{root / 'classes.txt'})"
            )
        first_line[key] = number
        labels[key] = sorted({index[n] for n in names})
    return Collection(
        root,
        classes,
        {k: images[k] for k in labels},
        labels,
        path,
        unlisted=tuple(images[k] for k in images if k not in labels),
    )


def _from_coco_file(
    root: Path, path: Path, images: dict[str, str], classes: tuple[str, ...] | None
) -> Collection:
    """A COCO-format collection with its own categories."""
    data = read_json(path, "annotation file")
    if classes is None:
        categories = data.get("categories") if isinstance(data, dict) else None
        by_id = custom_categories(categories, path)
        names = {c["id"]: c["name"].strip() for c in categories}
        classes = ("background", *(names[cid] for cid in sorted(by_id)))
        repeated = sorted({n for n in classes if classes.count(n) > 1})
        if repeated:
            raise DataError(
                f"annotation file {path}: category name(s) used twice: {first_few(repeated)}"
            )
    coco = parse_instances(data, path, root / "images", custom=True, class_names=classes)
    for key, entry in coco.images.items():
        if images.get(key) != entry.file_name:
            raise DataError(
                f"annotation file {path}: image {entry.image_id} file "
                f"{root / 'images' / entry.file_name} does not exist"
            )
    labels = {key: entry.labels for key, entry in coco.images.items()}
    return Collection(
        root,
        classes,
        {k: images[k] for k in labels},
        labels,
        path,
        coco,
        tuple(images[k] for k in images if k not in labels),
    )


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def read_collection(root: str | Path) -> Collection:
    """The parsed collection of ``root`` (re-read only when its files change)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    watched = (*LABEL_FILES, "classes.txt", "images")
    return _read_collection(root.resolve(), tuple(_stamp(root / n) for n in watched))


@functools.lru_cache(maxsize=8)
def _read_collection(root: Path, stamps: tuple) -> Collection:
    present = [root / n for n in LABEL_FILES if (root / n).is_file()]
    if not present:
        raise DataError(f"{root} has no labels: add one of {', '.join(LABEL_FILES)}")
    if len(present) > 1:
        raise DataError(
            f"{root} holds {' and '.join(p.name for p in present)}: keep one labels file"
        )
    images = find_images(root / "images")
    classes = read_class_list(root / "classes.txt")
    source = present[0]
    if source.suffix == ".json":
        collection = _from_coco_file(root, source, images, classes)
    else:
        collection = _from_label_file(root, source, images, classes)
    if len(collection.class_names) < 2:
        raise DataError(f"{source} names no class")
    if len(collection.class_names) > 255:
        raise DataError(
            f"{source}: {len(collection.class_names) - 1} classes; masks hold at most 254"
        )
    if not collection.files:
        raise DataError(f"{source} lists no image")
    return collection


def class_names_of(root: str | Path) -> tuple[str, ...]:
    """Background and the K classes of a tagged root."""
    return read_collection(root).class_names


# --------------------------------------------------------------------------------------------
# Masks of a COCO-format collection


def coco_mask_dir(collection: Collection, cache_dir: Path) -> Path:
    """Masks rasterised from the segmentations, written once into the cache folder (again
    when the annotation file changes)."""
    digest = hashlib.sha1(str(collection.root).encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"tags-{digest}"
    manifest_path = out / "masks.json"
    source = collection.labels_file
    stamp = {"version": MASKS_VERSION, "file": str(source), "stamp": list(_stamp(source) or ())}
    try:
        current = read_json(manifest_path) == stamp
    except DataError:
        current = False
    mask_dir = out / "masks"
    if not current:
        assert collection.coco is not None
        shutil.rmtree(mask_dir, ignore_errors=True)  # masks of an older annotation file
        for key, entry in collection.coco.images.items():
            if entry.segmented:
                write_bytes_atomic(
                    mask_dir / f"{key}.png", palette_png_bytes(rasterize(entry, str(source)))
                )
        mask_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(manifest_path, stamp)
    return mask_dir


# --------------------------------------------------------------------------------------------
# Layout


def held_back(ids: Iterable[str], fraction: float) -> list[str]:
    """A fixed ``fraction`` of ``ids`` (at least one of two or more when the fraction is
    positive, never all), chosen by a hash of each id: the same images whatever the order."""
    ids = sorted(ids)
    count = min(len(ids) - 1, max(1, round(fraction * len(ids)))) if fraction > 0 else 0
    ranked = sorted(ids, key=lambda i: hashlib.sha1(f"{SPLIT_SEED}:{i}".encode()).hexdigest())
    return sorted(ranked[: max(count, 0)])


@dataclass(frozen=True)
class TagsLayout(SegLayout):
    """A tagged collection read like a VOC tree (ids are image paths without suffix)."""

    root: Path
    collection: Collection
    masks: Path | None = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    masks_optional: bool = True

    @property
    def image_dir(self) -> Path:
        return self.collection.image_dir

    @property
    def mask_dir(self) -> Path | None:
        return self.masks if self.masks is not None and self.masks.is_dir() else None

    @property
    def split_dirs(self) -> tuple[Path, ...]:
        return (self.root / "splits",)

    def image_path(self, name: str) -> Path:
        return self.image_dir / self.collection.files[name]

    # Read as predict.py reads them (EXIF orientation, 16-bit, transparency), so a model sees
    # the same pixels in training and in use; masks are at the displayed size.
    def read_image(self, name: str) -> Image.Image:
        return read_display_rgb(self.image_path(name))

    def image_size(self, name: str) -> tuple[int, int]:
        return display_size(self.image_path(name))

    def present_images(self) -> set[str]:
        return set(self.collection.files)

    def annotation_labels(self) -> dict[str, list[int]]:
        return self.collection.labels

    def mask_names(self) -> set[str]:
        return set(self._masked)

    @functools.cached_property
    def _masked(self) -> frozenset[str]:
        """Ids with a mask, found once per layout (a walk of the mask tree)."""
        if self.mask_dir is None:
            return frozenset()
        return frozenset(_mask_ids(self.mask_dir) & set(self.collection.files))

    def available_splits(self) -> list[str]:
        return sorted({*super().available_splits(), "train", "val"})

    def split_ids(self, split: str) -> tuple[list[str], Path]:
        path = self.root / "splits" / f"{split}.txt"
        if path.is_file():
            return self._listed_ids(path), path
        if split not in ("train", "val"):
            self.split_path(split)  # raises, naming the splits there are
        masked = self.mask_names()
        everything = list(self.collection.files)
        if masked:
            val = sorted(masked)
            if split == "train" and len(val) == len(everything):
                raise DataError(
                    f"every image of {self.root} has a mask, so the default split "
                    f"'train' is empty: list the training images in {path}"
                )
        else:
            val = held_back(everything, self.val_fraction)
            if split == "val" and not val:
                raise DataError(
                    f"{self.root} has no mask and --val-fraction is "
                    f"{self.val_fraction:g}: no image is held back for validation "
                    f"(use --eval-every 0, a larger --val-fraction or {path})"
                )
        chosen = set(val)
        ids = val if split == "val" else [i for i in everything if i not in chosen]
        return ids, self.collection.labels_file

    def _listed_ids(self, path: Path) -> list[str]:
        """Ids of a split file (image paths, suffix optional); unknown entries name the line."""
        ids = []
        files = self.collection.files
        for number, line in enumerate(_read_lines(path), start=1):
            entry = line.strip()
            if not entry:
                continue
            key = image_id(entry) if image_id(entry) in files else entry
            if key not in files:
                raise DataError(
                    f"{path} line {number}: {entry!r} is not an image listed in "
                    f"{self.collection.labels_file}"
                )
            ids.append(key)
        return ids

    def notes(self) -> list[str]:
        unlisted = list(self.collection.unlisted)
        stray = (
            sorted(_mask_ids(self.mask_dir) - set(self.collection.files)) if self.mask_dir else []
        )
        out = []
        if unlisted:
            out.append(
                f"{len(unlisted)} image(s) in {self.image_dir} are not in "
                f"{self.collection.labels_file.name} and are left out: "
                f"{first_few(unlisted)}"
            )
        if stray:
            out.append(
                f"{len(stray)} mask(s) in {self.mask_dir} belong to no listed image: "
                f"{first_few(stray)}"
            )
        return out

    def split_has_masks(self, split: str) -> bool:
        """All ids of the split have masks (True), none (False); a mix is a DataError."""
        ids = self.read_split(split)
        masked = self.mask_names() & set(ids)
        if masked and len(masked) < len(ids):
            without = [i for i in ids if i not in masked]
            raise DataError(
                f"split '{split}' of {self.root}: {len(without)} of {len(ids)} "
                f"images have no mask in {self.mask_dir}: {first_few(without)} "
                "(validation needs masks for all of them or for none)"
            )
        return bool(masked)


def _mask_ids(mask_dir: Path) -> set[str]:
    """Ids of the PNGs under ``mask_dir`` (recursive)."""
    out = set()
    for folder, _, names in os.walk(mask_dir):
        for name in names:
            if name.endswith(".png"):
                out.add(Path(folder, name).relative_to(mask_dir).with_suffix("").as_posix())
    return out


def tags_layout(
    root: str | Path, cache_dir: str | Path | None, val_fraction: float = DEFAULT_VAL_FRACTION
) -> TagsLayout:
    """The layout of a tagged root; a COCO-format root's masks are rasterised into the cache."""
    collection = read_collection(root)
    masks = collection.root / "masks"
    if collection.coco is not None and any(e.segmented for e in collection.coco.images.values()):
        if masks.is_dir():
            raise DataError(
                f"{masks} and the segmentations of {collection.labels_file} both "
                "give masks: keep one"
            )
        if cache_dir is None:
            raise ConfigError(
                "a tagged root with segmentations needs a cache folder for its "
                "masks (cache_dir unset)"
            )
        masks = coco_mask_dir(collection, Path(cache_dir))
    return TagsLayout(collection.root, collection, masks, val_fraction)
