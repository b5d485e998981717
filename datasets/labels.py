"""Image-level labels of a split, with the cheap consistency checks and a JSON cache.

Sources, per image id:

1. its mask (the classes 1..C-1 present), read once and checked: PNG mode, size equal to the
   image's header size, values in 0..C-1 and 255;
2. where the mask is missing and masks are not required, its annotation file (VOC
   ``Annotations/<id>.xml``: every ``<object><name>``, difficult ones included);
3. where the layout carries annotation labels (COCO: every annotated category, crowd regions
   included), those replace the mask's classes, after checking that the mask holds no class the
   annotations do not list.

The per-id results of 1 and 2 are cached as JSON keyed by the files' size and mtime, so a
second start-up re-reads nothing and editing a file re-scans just that id.
"""

from __future__ import annotations

import hashlib
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datasets import parallel
from datasets.files import (
    IGNORE_INDEX,
    check_mask_values,
    check_same_size,
    first_few,
    image_size,
    read_json,
    read_mask,
    write_json_atomic,
)
from datasets.layout import SegLayout
from toco.atomic import remove_stale_temps
from toco.errors import ConfigError, DataError
from toco.runtime import available_cores, local_processes

LABEL_CACHE_VERSION = 2


def check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= IGNORE_INDEX:
        raise ConfigError(f"num_classes must be in 2..{IGNORE_INDEX}, got {num_classes}")


def scan_mask(
    image: Path, mask: Path, num_classes: int, size: tuple[int, int] | None = None
) -> list[int]:
    """Classes 1..C-1 present in ``mask``, after the cheap consistency checks (``size``: the
    image's (width, height) where it is not the header's)."""
    values = read_mask(mask)
    check_same_size(values.shape, size or image_size(image), mask, image)
    counts = check_mask_values(values, num_classes, mask)
    return [c for c in range(1, num_classes) if counts[c]]


def xml_labels(path: Path, class_names: Sequence[str]) -> list[int]:
    """Sorted class ids of the ``<object><name>`` entries of a VOC annotation file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DataError(f"cannot read annotation {path}: {exc}") from exc
    index = {name: i for i, name in enumerate(class_names)}
    found = set()
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index or index[name] == 0:
            raise DataError(f"annotation {path} names unknown class {name!r}")
        found.add(index[name])
    return sorted(found)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _entry_is_current(entry: Any, stamps: dict[str, list[int]], num_classes: int) -> bool:
    """A cache entry is reused only if its files are unchanged and its labels are sane."""
    if not isinstance(entry, dict) or set(entry) != {"labels", *stamps}:
        return False
    if any(entry.get(k) != v for k, v in stamps.items()):
        return False
    labels = entry.get("labels")
    return isinstance(labels, list) and all(type(c) is int and 1 <= c < num_classes for c in labels)


def label_cache_path(cache_dir: Path, root: Path, split: str, num_classes: int) -> Path:
    key = f"{Path(root).resolve()}|{split}|{num_classes}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"labels-{split}-{digest}.json"


def _load_cache(path: Path | None, header: dict[str, Any]) -> dict[str, Any]:
    """Cached entries, or {} when absent, unreadable or written for another tree/version."""
    if path is None or not path.is_file():
        return {}
    try:
        data = read_json(path)
    except DataError:
        return {}  # a damaged cache is only a cache: rebuild it
    if not isinstance(data, dict) or {k: data.get(k) for k in header} != header:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _missing_message(
    split: str, missing: list[str], mask_dir: Path | None, xml: bool, layout: SegLayout
) -> str:
    where = f"no mask in {mask_dir}" if mask_dir is not None else f"no mask folder in {layout.root}"
    if xml:  # the layout has per-image annotation files
        where = f"no annotation in {layout.annotation_path(missing[0]).parent} and {where}"
    return f"{len(missing)} id(s) of split '{split}' have {where}: {first_few(missing)}"


def _scan_entries(
    layout: SegLayout,
    split: str,
    names: list[str],
    num_classes: int,
    cache_dir: Path | None,
    require_masks: bool,
    class_names: Sequence[str] | None,
) -> dict[str, dict[str, Any]]:
    """Per-id {"labels", stamps} from masks (or XML), through the JSON cache."""
    mask_dir = layout.mask_dir if not require_masks else layout.require_mask_dir()
    with_mask = layout.mask_names() & set(names)
    use_xml = (
        not require_masks
        and class_names is not None
        and layout.annotation_path(names[0]) is not None
    )
    xml_paths = {}
    if use_xml:
        for name in names:
            path = layout.annotation_path(name) if name not in with_mask else None
            if path is not None and path.is_file():
                xml_paths[name] = path
    # Ids the layout labels itself (a tagged collection) need neither mask nor annotation file.
    tagged = (
        set(layout.annotation_labels() or ())
        if layout.masks_optional and not require_masks
        else set()
    )
    missing = [n for n in names if n not in with_mask and n not in xml_paths and n not in tagged]
    if missing:
        raise DataError(_missing_message(split, missing, mask_dir, use_xml, layout))

    header = {
        "version": LABEL_CACHE_VERSION,
        "root": str(Path(layout.root).resolve()),
        "split": split,
        "num_classes": num_classes,
        "mask_dir": str(mask_dir.resolve()) if mask_dir is not None else None,
    }
    cache_path = label_cache_path(cache_dir, layout.root, split, num_classes) if cache_dir else None
    cached = _load_cache(cache_path, header)
    entries: dict[str, dict[str, Any]] = {}
    to_scan: list[str] = []  # masks read below, in parallel when there are many
    for name in names:
        image = layout.image_path(name)
        source = (
            layout.mask_path(name) if name in with_mask else xml_paths.get(name)
        )  # None: labelled by the layout only
        kind = "mask" if name in with_mask else "xml"
        stamps = {"image": _stamp(image)}
        if source is not None:
            stamps[kind] = _stamp(source)
        old = cached.get(name)
        if _entry_is_current(old, stamps, num_classes):
            entries[name] = old
        elif kind == "mask":
            entries[name] = stamps
            to_scan.append(name)
        else:
            layout.image_size(name)  # the header must be readable, as for masked images
            labels = xml_labels(source, class_names) if source is not None else []
            entries[name] = {"labels": labels, **stamps}
    for name, labels in zip(to_scan, _scan_masks(layout, to_scan, num_classes)):
        entries[name] = {"labels": labels, **entries[name]}
    if cache_path is not None and entries != cached:
        try:
            remove_stale_temps(cache_path)  # of a writer killed earlier
            write_json_atomic(cache_path, {**header, "entries": entries})
        except OSError as exc:  # a cache that cannot be written only costs time
            warnings.warn(f"could not write label cache {cache_path}: {exc}", stacklevel=3)
    if xml_paths and len(xml_paths) < len(names):
        warnings.warn(
            f"split '{split}' of {layout.root}: {len(xml_paths)} image(s) have no mask; their "
            f"labels come from their annotation files: {first_few(sorted(xml_paths))}",
            stacklevel=3,
        )
    return entries


MIN_MASKS_PER_WORKER = 2000  # below this many masks per process, a pool costs more than it saves


def _scan_one(name: str) -> list[int]:
    layout, num_classes = parallel.job()
    return scan_mask(layout.image_path(name), layout.mask_path(name), num_classes,
                     layout.image_size(name))  # fmt: skip


def _scan_masks(layout: SegLayout, names: list[str], num_classes: int) -> list[list[int]]:
    """scan_mask of each name, in order. Reading every mask is a large part of a first start at
    COCO size (82,783 PNGs and JPEG headers), so a large scan runs in processes on this machine's
    share of the cores (one share per rank under torchrun). The error raised is the first
    name's, as without processes."""
    cores = available_cores() // local_processes()
    workers = parallel.worker_count(cores, len(names), MIN_MASKS_PER_WORKER)
    with parallel.mapped(_scan_one, (layout, num_classes), names, workers, chunksize=256) as out:
        return list(out)


def label_mismatch(mask: Path, mask_classes: list[int], labels: list[int]) -> str | None:
    """A one-line problem when the mask holds a class the image's annotations do not list."""
    extra = sorted(set(mask_classes) - set(labels))
    if not extra:
        return None
    return (
        f"mask {mask} holds class(es) {extra} that the image's annotations do not list "
        f"({sorted(labels)})"
    )


def apply_annotation_labels(
    layout: SegLayout, names: list[str], entries: dict[str, dict[str, Any]], num_classes: int
) -> dict[str, list[int]]:
    """Labels per id: the annotation labels where the layout has them, else the scanned ones.

    A mask class that the image's annotations do not list means the masks and annotations
    disagree (e.g. another id scheme): a DataError naming the mask.
    """
    given = layout.annotation_labels()
    if given is None:
        return {n: entries[n]["labels"] for n in names}
    out = {}
    for name in names:
        if name not in given:
            raise DataError(
                f"image {layout.image_path(name)} has no entry in the annotation labels"
            )
        labels = given[name]
        if not all(type(c) is int and 1 <= c < num_classes for c in labels):
            raise DataError(f"annotation labels of {name} hold ids outside 1..{num_classes - 1}")
        if "mask" in entries[name]:
            problem = label_mismatch(layout.mask_path(name), entries[name]["labels"], labels)
            if problem:
                raise DataError(problem)
        out[name] = sorted(labels)
    return out


def to_vector(classes: list[int], num_classes: int) -> np.ndarray:
    """Multi-hot float32 vector of length C-1 (background excluded) for class ids 1..C-1."""
    vector = np.zeros(num_classes - 1, dtype=np.float32)
    vector[np.asarray(classes, dtype=np.int64) - 1] = 1.0
    return vector


def image_labels(
    layout: SegLayout,
    split: str,
    num_classes: int,
    cache_dir: Path | None = None,
    *,
    drop_empty: bool = True,
    require_masks: bool = True,
    class_names: Sequence[str] | None = None,
    source: str = "masks",
) -> dict[str, np.ndarray]:
    """Image-level labels (float32 0/1, length C-1, no background) of ``split``.

    Args:
        layout: the tree.
        split: split name.
        num_classes: C, background included.
        cache_dir: where the JSON cache lives (None: no cache).
        drop_empty: leave out (with a warning) ids without a foreground class: training needs
            a label.
        require_masks: every id needs a mask (evaluation); otherwise ids without one take their
            labels from their annotation file (needs ``class_names``).
        class_names: the C class names, for annotation files that name classes.
        source: "masks" (the classes present in each mask) or "annotations" (every object
            of the image's annotation file, e.g. VOC ``Annotations/<id>.xml``, as ToCo's label
            file; the masks are still checked, and ids without an annotation file keep their
            mask's classes).
    """
    check_num_classes(num_classes)
    if source not in ("masks", "annotations"):
        raise ValueError(f"label source must be 'masks' or 'annotations', got {source!r}")
    names = layout.read_split(split)
    entries = _scan_entries(layout, split, names, num_classes, cache_dir, require_masks,
                            class_names)  # fmt: skip
    classes = apply_annotation_labels(layout, names, entries, num_classes)
    if source == "annotations":
        _use_annotation_files(layout, split, names, classes, class_names)
    labels: dict[str, np.ndarray] = {}
    empty = []
    for name in names:
        if not classes[name] and drop_empty:
            empty.append(name)
            continue
        labels[name] = to_vector(classes[name], num_classes)
    if empty:
        warnings.warn(
            f"split '{split}' of {layout.root}: {len(empty)} image(s) with no foreground class "
            f"left out of training: {first_few(empty)}",
            stacklevel=2,
        )
    if not labels:
        raise DataError(f"split '{split}' of {layout.root} has no image with a foreground class")
    return labels


def _use_annotation_files(
    layout: SegLayout,
    split: str,
    names: list[str],
    classes: dict[str, list[int]],
    class_names: Sequence[str] | None,
) -> None:
    """Replace the classes of every id that has an annotation file by that file's objects."""
    if layout.annotation_labels() is not None:
        return  # the layout's labels already come from its annotations (COCO)
    without = []
    for name in names:
        path = layout.annotation_path(name)
        if class_names is not None and path is not None and path.is_file():
            classes[name] = xml_labels(path, class_names)
        else:
            without.append(name)
    if without:
        warnings.warn(
            f"split '{split}' of {layout.root}: labels from annotation files were asked for, "
            f"but {len(without)} of {len(names)} id(s) have none; they use their mask's "
            f"classes: {first_few(without)}",
            stacklevel=3,
        )


def annotation_file_labels(
    layout: SegLayout, names: list[str], num_classes: int, class_names: Sequence[str] | None
) -> dict[str, np.ndarray]:
    """Labels for an inference split without masks: from annotation files where present."""
    given = layout.annotation_labels() or {}
    out = {}
    for name in names:
        path = layout.annotation_path(name)
        if name in given:
            classes = given[name]
        elif class_names is not None and path is not None and path.is_file():
            classes = xml_labels(path, class_names)
        else:
            classes = []
        out[name] = to_vector(classes, num_classes)
    return out
