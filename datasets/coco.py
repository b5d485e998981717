"""MS COCO 2014 as a VOC-style tree: masks prepared once from the instances JSON, or pre-converted.

A COCO root ``DIR`` holds ``train2014/``, ``val2014/`` (JPEGs, grayscale ones included) and
``annotations/instances_{train,val}2014.json``. ``prepare`` writes, for each subset, into a
prepared folder ``P`` (by default ``<cache_dir>/coco-<hash of DIR>``)::

    P/SegmentationClass/<subset>/<stem>.png    palette PNG masks, 0..80 and 255
    P/ImageSets/Segmentation/train.txt         labelled train2014 images, sorted
    P/ImageSets/Segmentation/val.txt           labelled val2014 images, sorted (the final number)
    P/ImageSets/Segmentation/val_part.txt      the first 5,000 of val.txt (in-training validation)
    P/ImageLabels/<subset>.json                image-level labels from the annotations
    P/manifest-<subset>.json                   source file stamp, rule, sha1 of every mask

Masks are written atomically one by one and recorded in the manifest in batches; an interrupted
run resumes, trusting only masks the manifest lists whose checksum still matches. Masks already
converted in ToCo's layout (``DIR/SegmentationClass/<subset>/<stem>.png``) are used instead of
generating them; ``compare_preconverted`` checks that they agree with the annotations.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from datasets import parallel
from datasets.coco_annotations import (
    CATEGORY_TO_CLASS,
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    OVERLAP_RULE,
    CocoImage,
    CocoIndex,
    instances_from_bytes,
    load_instances,
    rasterize,
)
from datasets.files import (
    IGNORE_INDEX,
    palette_png_bytes,
    read_json,
    read_mask,
    sha1_file,
    stems,
    write_bytes_atomic,
    write_json_atomic,
)
from datasets.layout import SegLayout
from toco.atomic import remove_stale_temps
from toco.errors import DataError
from toco.runtime import available_cores

COCO_SUBSETS = ("train2014", "val2014")
VAL_PART_SIZE = 5000
PREPARE_VERSION = 1
# Masks written between two manifest checkpoints. Each checkpoint rewrites every checksum so
# far, so the writes grow with the subset: at 1000, COCO train's 83 checkpoints took 6% of its
# preparation (profiled); at 5000 a killed run redoes at most a few seconds of rendering.
CHECKPOINT_EVERY = 5000
MIN_MASKS_PER_WORKER = 256  # fewer masks than this per process: render them in fewer processes
AGREEMENT_THRESHOLD = 0.9  # pre-converted vs annotations: share of commonly labelled pixels


def subset_of_split(split: str) -> str:
    """train* splits read train2014, every other split val2014."""
    return "train2014" if split.startswith("train") else "val2014"


def prepared_dir(data_root: str | Path, cache_dir: str | Path) -> Path:
    """The default prepared folder of ``data_root``: ``<cache_dir>/coco-<hash of the root>``."""
    digest = hashlib.sha1(str(Path(data_root).resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"coco-{digest}"


def annotation_file(data_root: Path, subset: str) -> Path:
    return Path(data_root) / "annotations" / f"instances_{subset}.json"


def preconverted_dir(data_root: Path, subset: str) -> Path:
    return Path(data_root) / "SegmentationClass" / subset


def manifest_path(prepared: Path, subset: str) -> Path:
    return prepared / f"manifest-{subset}.json"


def labels_path(prepared: Path, subset: str) -> Path:
    return prepared / "ImageLabels" / f"{subset}.json"


# --------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class COCOLayout(SegLayout):
    """One subset of a COCO root, read like a VOC tree.

    Masks: ``root/SegmentationClass/<subset>`` (pre-converted) when present, else the prepared
    folder's. Split lists: ``root/ImageSets/Segmentation`` first, then the prepared folder's.
    """

    root: Path
    subset: str
    prepared: Path
    image_suffix: str = ".jpg"
    labels: dict[str, list[int]] | None = field(default=None, compare=False, repr=False)

    @property
    def image_dir(self) -> Path:
        return self.root / self.subset

    @property
    def mask_dir(self) -> Path | None:
        for folder in (preconverted_dir(self.root, self.subset),
                       self.prepared / "SegmentationClass" / self.subset):  # fmt: skip
            if folder.is_dir():
                return folder
        return None

    def require_mask_dir(self) -> Path:
        mask_dir = self.mask_dir
        if mask_dir is None:
            raise DataError(
                f"no masks for {self.subset}: neither {preconverted_dir(self.root, self.subset)} "
                f"nor {self.prepared / 'SegmentationClass' / self.subset} exists"
            )
        return mask_dir

    @property
    def split_dirs(self) -> tuple[Path, ...]:
        return (self.root / "ImageSets" / "Segmentation",
                self.prepared / "ImageSets" / "Segmentation")  # fmt: skip

    def annotation_labels(self) -> dict[str, list[int]] | None:
        """Labels from the annotations (``ImageLabels/<subset>.json``), None without them."""
        return self.labels


def read_labels_file(path: Path) -> tuple[dict[str, list[int]], str]:
    """(labels by image stem, image file suffix) written by prepare."""
    data = read_json(path, "label file")
    labels = data.get("labels") if isinstance(data, dict) else None
    suffix = data.get("image_suffix", ".jpg") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not isinstance(suffix, str):
        raise DataError(f"label file {path} is malformed; run prepare again")
    return labels, suffix


def coco_layout(
    data_root: str | Path,
    split: str,
    cache_dir: str | Path | None,
    prepared: str | Path | None = None,
    *,
    prepare: bool = True,
) -> COCOLayout:
    """The layout of ``split``, preparing its subset first (once; resumable) when needed."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    if prepared is None:
        if cache_dir is None:
            raise DataError("COCO needs a cache folder for its prepared masks (cache_dir unset)")
        prepared = prepared_dir(root, cache_dir)
    subset = subset_of_split(split)
    image_dir = root / subset
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} not found: a COCO root needs train2014/, "
                        "val2014/ and annotations/instances_{train,val}2014.json")  # fmt: skip
    if prepare:
        ensure_prepared(root, Path(prepared), [subset], workers=preparing_workers())
    path = labels_path(Path(prepared), subset)
    if not annotation_file(root, subset).is_file() or not path.is_file():
        return COCOLayout(root, subset, Path(prepared))  # labels from the masks
    labels, suffix = read_labels_file(path)
    return COCOLayout(root, subset, Path(prepared), suffix, labels)


# --------------------------------------------------------------------------------------------
# Preparation


def _source_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _mask_mode(data_root: Path, prepared: Path, subset: str) -> str:
    """'preconverted' when the root brings masks that prepare did not write itself."""
    theirs = preconverted_dir(data_root, subset)
    ours = Path(prepared) / "SegmentationClass" / subset
    if theirs.is_dir() and theirs.resolve() != ours.resolve():
        return "preconverted"
    return "generated"


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path, "manifest")
    except DataError:
        return None
    return data if isinstance(data, dict) else None


def _manifest_fits(manifest: dict[str, Any] | None, mode: str) -> bool:
    return (manifest is not None and manifest.get("version") == PREPARE_VERSION
            and manifest.get("rule") == OVERLAP_RULE and manifest.get("masks") == mode)  # fmt: skip


def is_prepared(data_root: Path, prepared: Path, subset: str) -> bool:
    """Cheap start-up test: a complete manifest for the current annotation file and mask mode."""
    ann = annotation_file(data_root, subset)
    manifest = _load_manifest(manifest_path(prepared, subset))
    if not ann.is_file() or not _manifest_fits(manifest, _mask_mode(data_root, prepared, subset)):
        return False
    stamp = {k: v for k, v in _source_stamp(ann).items() if k != "file"}
    source = manifest.get("source") or {}
    return bool(manifest.get("complete")) and all(source.get(k) == v for k, v in stamp.items())


@contextlib.contextmanager
def _exclusive(prepared: Path, subset: str) -> Iterator[None]:
    """One preparing process per subset (e.g. several ranks starting at once); others wait."""
    prepared.mkdir(parents=True, exist_ok=True)
    with open(prepared / f".lock-{subset}", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def preparing_workers() -> int:
    """Processes for a preparation that a training or evaluation start triggers: the machine's
    cores, at most 16. It comes before the first step, and under torchrun one rank prepares
    while the others wait on its lock, so nothing else needs the cores yet."""
    return max(1, min(16, available_cores()))


def ensure_prepared(
    data_root: Path, prepared: Path, subsets: Iterable[str], workers: int = 1
) -> None:
    """Prepare each subset unless already done; without annotations, use pre-converted masks."""
    for subset in subsets:
        if annotation_file(data_root, subset).is_file():
            if is_prepared(data_root, prepared, subset):
                continue
            with _exclusive(prepared, subset):
                if is_prepared(data_root, prepared, subset):  # another process just did it
                    continue
                print(f"preparing COCO {subset} from {annotation_file(data_root, subset)} into "
                      f"{prepared} (once; resumable)", file=sys.stderr, flush=True)  # fmt: skip
                prepare_subset(data_root, prepared, subset, workers=workers, lock=False)
        elif preconverted_dir(data_root, subset).is_dir():
            names = sorted(stems(preconverted_dir(data_root, subset), ".png"))
            if not names:
                raise DataError(f"{preconverted_dir(data_root, subset)} holds no PNG mask")
            write_split_lists(prepared, subset, names)
        else:
            raise DataError(
                f"{data_root} has neither {annotation_file(data_root, subset)} nor pre-converted "
                f"masks in {preconverted_dir(data_root, subset)}"
            )


def _outputs(prepared: Path, subset: str) -> list[Path]:
    """The files prepare writes for `subset`, masks aside."""
    lists = ("train",) if subset == "train2014" else ("val", "val_part")
    return [
        labels_path(prepared, subset),
        manifest_path(prepared, subset),
        *(prepared / "ImageSets" / "Segmentation" / f"{s}.txt" for s in lists),
    ]


def write_split_lists(prepared: Path, subset: str, names: list[str]) -> None:
    """The subset's lists (train / val and val_part), rewritten only when they change."""
    lists = (
        {"train": names}
        if subset == "train2014"
        else {"val": names, "val_part": names[:VAL_PART_SIZE]}
    )
    for split, ids in lists.items():
        path = prepared / "ImageSets" / "Segmentation" / f"{split}.txt"
        text = "".join(f"{n}\n" for n in ids).encode()
        if not path.is_file() or path.read_bytes() != text:
            write_bytes_atomic(path, text)


def _render(task: tuple[str, str, str]) -> tuple[str, str]:
    """Worker: rasterise one image of the shared index (by stem), write its PNG atomically,
    return (stem, sha1)."""
    stem, out, where = task
    images: Mapping[str, CocoImage] = parallel.job()
    # a cache, not a deliverable: the fastest zlib level (the same pixels, ~2x the bytes)
    payload = palette_png_bytes(rasterize(images[stem], where), compress_level=1)
    write_bytes_atomic(Path(out), payload)
    return stem, hashlib.sha1(payload).hexdigest()


def _trusted_masks(
    manifest: dict[str, Any] | None, mask_dir: Path, sha1: str, wanted: set[str]
) -> dict[str, str]:
    """Masks from an earlier (maybe interrupted) run of the same source whose file still matches
    the recorded checksum; everything else is regenerated."""
    if manifest is None or (manifest.get("source") or {}).get("sha1") != sha1:
        return {}
    recorded = manifest.get("checksums") or {}
    trusted = {}
    for stem, digest in recorded.items():
        path = mask_dir / f"{stem}.png"
        if stem in wanted and path.is_file() and sha1_file(path) == digest:
            trusted[stem] = digest
    return trusted


def _clean_mask_dir(mask_dir: Path, wanted: set[str]) -> None:
    """Remove temp files of killed runs and masks of images the source no longer lists."""
    for name in os.listdir(mask_dir):
        stem = name[:-4] if name.endswith(".png") else None
        if name.endswith(".tmp") or (stem is not None and stem not in wanted):
            (mask_dir / name).unlink(missing_ok=True)


def prepare_subset(
    data_root: Path,
    prepared: Path,
    subset: str,
    *,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    lock: bool = True,
) -> dict[str, Any]:
    """Labels, split lists and (unless pre-converted) masks of ``subset``; returns the manifest.

    Resumable: masks recorded in the manifest of an interrupted run of the same annotation
    file are kept when their checksum matches; all other outputs are rewritten. Running it on
    a prepared subset re-verifies every mask and regenerates the ones that do not match.
    ``lock=False`` is for callers that already hold the subset's lock.
    """
    data_root, prepared = Path(data_root), Path(prepared)
    with _exclusive(prepared, subset) if lock else contextlib.nullcontext():
        index, source = _read_source(annotation_file(data_root, subset), data_root / subset)
        mode = _mask_mode(data_root, prepared, subset)
        manifest: dict[str, Any] = {
            "format": "toco-coco-prepared", "version": PREPARE_VERSION, "rule": OVERLAP_RULE,
            "subset": subset, "source": source, "masks": mode, "complete": False,
            "classes": list(COCO_CLASSES), "checksums": {},
        }  # fmt: skip
        for path in _outputs(prepared, subset):  # temp files of a killed run (we hold the lock)
            remove_stale_temps(path)
        write_json_atomic(labels_path(prepared, subset), {
            "version": PREPARE_VERSION, "source_sha1": source["sha1"],
            "image_suffix": index.suffix, "classes": list(COCO_CLASSES),
            "labels": {s: index.images[s].labels for s in index.labelled()},
        })  # fmt: skip
        write_split_lists(prepared, subset, index.labelled())
        if mode == "generated":
            _generate_masks(index, prepared, subset, manifest, workers, progress)
        else:
            _warn_on_disagreement(data_root, subset, index)
        manifest["complete"] = True
        write_json_atomic(manifest_path(prepared, subset), manifest)
        return manifest


def _read_source(ann: Path, image_dir: Path) -> tuple[CocoIndex, dict[str, Any]]:
    """The validated index of an annotation file and its identity (stamp + sha1)."""
    try:
        raw = ann.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read annotation file {ann}: {exc}") from exc
    index = instances_from_bytes(raw, ann, image_dir)
    if not index.labelled():
        raise DataError(f"annotation file {ann} annotates no image")
    return index, {**_source_stamp(ann), "sha1": hashlib.sha1(raw).hexdigest()}


def _generate_masks(
    index: CocoIndex,
    prepared: Path,
    subset: str,
    manifest: dict[str, Any],
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Render the masks the previous manifest does not vouch for; fills manifest checksums."""
    names = index.labelled()
    manifest_file = manifest_path(prepared, subset)
    old = _load_manifest(manifest_file)
    mask_dir = prepared / "SegmentationClass" / subset
    mask_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(names)
    trusted = _trusted_masks(old if _manifest_fits(old, manifest["masks"]) else None, mask_dir,
                             manifest["source"]["sha1"], wanted)  # fmt: skip
    _clean_mask_dir(mask_dir, wanted)
    manifest["checksums"] = dict(trusted)
    write_json_atomic(manifest_file, manifest)
    todo = [(s, str(mask_dir / f"{s}.png"), str(index.path)) for s in names if s not in trusted]
    _render_all(index, todo, manifest, manifest_file, workers, progress, len(names))
    manifest["checksums"] = dict(sorted(manifest["checksums"].items()))


def _render_all(
    index: CocoIndex,
    todo: list,
    manifest: dict[str, Any],
    manifest_file: Path,
    workers: int,
    progress: Callable[[int, int], None] | None,
    total: int,
) -> None:
    """Render ``todo``, checkpointing the manifest every CHECKPOINT_EVERY masks."""
    checksums = manifest["checksums"]
    workers = parallel.worker_count(workers, len(todo), MIN_MASKS_PER_WORKER)
    with parallel.mapped(_render, index.images, todo, workers, ordered=False) as results:
        bar = tqdm(results, total=total, initial=total - len(todo), unit="mask", disable=None,
                   file=sys.stderr)  # fmt: skip
        for count, (stem, digest) in enumerate(bar, start=1):
            checksums[stem] = digest
            if count % CHECKPOINT_EVERY == 0:
                write_json_atomic(manifest_file, manifest)
            if progress is not None:
                progress(len(checksums), total)


def verify_masks(prepared: Path, subset: str) -> list[str]:
    """Problems (one line each, naming the file) of generated masks against their manifest."""
    path = manifest_path(prepared, subset)
    manifest = _load_manifest(path)
    if manifest is None:
        return [f"manifest {path} is missing or unreadable: run prepare"]
    if not manifest.get("complete"):
        return [f"manifest {path} marks an unfinished prepare: run prepare again to resume"]
    problems = []
    mask_dir = prepared / "SegmentationClass" / subset
    for stem, digest in (manifest.get("checksums") or {}).items():
        mask = mask_dir / f"{stem}.png"
        if not mask.is_file():
            problems.append(f"mask {mask} listed in {path} is missing")
        elif sha1_file(mask) != digest:
            problems.append(f"mask {mask} does not match its checksum in {path} "
                            "(changed after prepare; run prepare to regenerate it)")  # fmt: skip
    return problems


# --------------------------------------------------------------------------------------------
# Agreement of pre-converted masks with the annotations


@functools.lru_cache(maxsize=1)
def _raw_id_lookup() -> np.ndarray:
    """Contiguous class id → raw COCO category id (255 stays 255)."""
    lut = np.arange(256, dtype=np.uint8)
    lut[1:81] = COCO_CATEGORY_IDS
    return lut


def mask_agreement(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Share of the pixels labelled (not 255) in both masks on which they agree (1.0 if none)."""
    both = (ours != IGNORE_INDEX) & (theirs != IGNORE_INDEX)
    return float((ours[both] == theirs[both]).mean()) if both.any() else 1.0


def compare_one(image: CocoImage, mask_path: Path, where: str) -> str | None:
    """A one-line problem when a pre-converted mask disagrees with the annotations, else None."""
    if not mask_path.is_file():
        return f"pre-converted mask {mask_path} is missing"
    theirs = read_mask(mask_path)
    if theirs.shape != (image.height, image.width):
        return (f"pre-converted mask {mask_path} is {theirs.shape[1]}x{theirs.shape[0]} but the "
                f"annotations say {image.width}x{image.height}")  # fmt: skip
    ours = rasterize(image, where)
    agreement = mask_agreement(ours, theirs)
    if agreement >= AGREEMENT_THRESHOLD:
        return None
    raw = mask_agreement(_raw_id_lookup()[ours], theirs)
    hint = (" (it holds raw COCO category ids; ToCo's masks use contiguous ids 0..80)"
            if raw > agreement else "")  # fmt: skip
    return (f"pre-converted mask {mask_path} agrees with {where} on only {agreement:.1%} of the "
            f"pixels both label{hint}")  # fmt: skip


def sample_evenly(names: Sequence[str], count: int) -> list[str]:
    """``count`` names spread evenly over ``names`` (all of them when count <= 0 or larger)."""
    if count <= 0 or count >= len(names):
        return list(names)
    return [names[int(i * len(names) / count)] for i in range(count)]


def compare_preconverted(
    data_root: Path, subset: str, sample: int = 200, index: CocoIndex | None = None
) -> tuple[int, list[str]]:
    """(number compared, problems) for pre-converted masks against the annotations."""
    data_root = Path(data_root)
    folder = preconverted_dir(data_root, subset)
    if not folder.is_dir():
        return 0, [f"no pre-converted masks to compare: {folder} does not exist"]
    index = index or load_instances(annotation_file(data_root, subset), data_root / subset)
    chosen = sample_evenly(index.labelled(), sample)
    problems = [p for p in (compare_one(index.images[s], folder / f"{s}.png", str(index.path))
                            for s in chosen) if p]  # fmt: skip
    return len(chosen), problems


def _warn_on_disagreement(data_root: Path, subset: str, index: CocoIndex) -> None:
    compared, problems = compare_preconverted(data_root, subset, sample=50, index=index)
    if len(problems) > compared // 10:
        warnings.warn(
            f"{len(problems)} of {compared} pre-converted masks in "
            f"{preconverted_dir(data_root, subset)} disagree with the annotations, e.g. "
            f"{problems[0]}; see python -m datasets.check --dataset coco",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Command line: python -m datasets.coco prepare|compare --data-root DIR


def _progress_printer() -> Callable[[int, int], None]:
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] > 5 or done == total:
            last[0] = now
            print(f"  {done}/{total} masks", file=sys.stderr, flush=True)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    from toco.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m datasets.coco", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["prepare", "compare"])
    parser.add_argument("--data-root", required=True, help="COCO root (train2014/, ...)")
    parser.add_argument("--cache-dir", default=".cache", help="parent of the prepared folder")
    parser.add_argument("--out", help="prepared folder (default: <cache-dir>/coco-<hash>)")
    parser.add_argument("--subsets", nargs="+", choices=COCO_SUBSETS, default=list(COCO_SUBSETS))
    parser.add_argument("--workers", type=int, default=1, help="processes rendering masks")
    parser.add_argument(
        "--sample", type=int, default=200, help="compare: images per subset (0 = all)"
    )
    args = parser.parse_args(argv)
    root = Path(args.data_root)
    out = Path(args.out) if args.out else prepared_dir(root, args.cache_dir)
    if args.command == "prepare":
        for subset in args.subsets:
            start = time.perf_counter()
            manifest = prepare_subset(root, out, subset, workers=max(1, args.workers),
                                      progress=None if sys.stderr.isatty()  # tqdm there
                                      else _progress_printer())  # fmt: skip
            seconds, made = time.perf_counter() - start, len(manifest["checksums"])
            rate = (
                (
                    f" ({made / seconds:.0f} masks/s, {made / seconds / max(1, args.workers):.0f} "
                    "per worker)"
                )
                if made
                else ""
            )
            print(f"{subset}: {made or 'pre-converted'} masks, {seconds:.2f} s{rate} "
                  f"-> {out}")  # fmt: skip
        return 0
    failed = 0
    for subset in args.subsets:
        compared, problems = compare_preconverted(root, subset, args.sample)
        for line in problems:
            print(line)
        if compared:
            print(f"{subset}: {compared - len(problems)}/{compared} pre-converted masks agree")
        failed += len(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    from toco.cli import run_cli

    sys.exit(run_cli(lambda: main()))


__all__ = [
    "CATEGORY_TO_CLASS",
    "COCOLayout",
    "COCO_CATEGORY_IDS",
    "COCO_CLASSES",
    "OVERLAP_RULE",
    "coco_layout",
    "compare_preconverted",
    "ensure_prepared",
    "is_prepared",
    "prepare_subset",
    "prepared_dir",
    "preparing_workers",
    "rasterize",
    "verify_masks",
]
