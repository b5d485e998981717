"""Validate a dataset tree before hours of training: ``python -m datasets.check``.

    python -m datasets.check --dataset voc --data-root VOCdevkit/VOC2012
    python -m datasets.check --dataset coco --data-root coco2014 --splits train val
    python -m datasets.check --dataset voc --data-root VOCdevkit/VOC2012 --splits test --quick

Every image of every checked split is looked at: split files (missing, malformed, empty,
duplicate ids), images (missing, unreadable or corrupt: fully decoded unless ``--quick``),
masks (missing, not an index PNG, size different from the image, values outside 0..C-1 and
255), image-level labels (empty label sets, mask classes the annotations do not list) and, for
COCO, the instances JSON, the checksum manifest of prepared masks and the agreement of
pre-converted masks with the annotations. Splits named ``test*`` need no masks. Each problem is
one line naming the file; the command prints a summary and exits 1 when it found any (0
otherwise, 2 for bad arguments). Training runs the cheap part (split files, existence, image
headers, masks) at start-up through the same functions.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from datasets import get_dataset_spec, parallel
from datasets.coco import (
    annotation_file,
    coco_layout,
    compare_preconverted,
    is_prepared,
    preconverted_dir,
    prepared_dir,
    subset_of_split,
    verify_masks,
)
from datasets.coco_annotations import load_instances
from datasets.files import check_mask_values, check_same_size, read_mask
from datasets.labels import label_mismatch, xml_labels
from datasets.layout import SegLayout, duplicate_ids
from toco.errors import DataError

SHOWN_PER_KIND = 10
MIN_ITEMS_PER_WORKER = 32  # fewer images per process: check them in fewer processes


@dataclass(frozen=True)
class Problem:
    """One bad input: a kind (for the summary) and a one-line message naming the file."""

    kind: str
    message: str


@dataclass
class Report:
    """Problems found and one line per checked part."""

    lines: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    images: int = 0

    def add(self, kind: str, message: str) -> None:
        self.problems.append(Problem(kind, message))


@dataclass(frozen=True)
class ItemCheck:
    """What to check for each id of a split (the job the worker processes share)."""

    layout: SegLayout
    num_classes: int
    class_names: tuple[str, ...]
    need_masks: bool
    decode: bool
    given: dict[str, list[int]] | None


def check_item(job: ItemCheck, name: str) -> list[Problem]:
    """Problems of one id: its image, its mask (or annotation file) and its labels."""
    layout, problems = job.layout, []
    image = layout.image_path(name)
    if not image.is_file():
        return [Problem("missing-image", f"image {image} does not exist")]
    size = None
    try:
        size = layout.read_image(name).size if job.decode else layout.image_size(name)
    except DataError as err:
        problems.append(Problem("bad-image", str(err)))
    mask_dir = layout.mask_dir
    mask = mask_dir / f"{name}.png" if mask_dir is not None else None
    xml = layout.annotation_path(name)
    classes = None
    if mask is not None and mask.is_file():
        try:
            values = read_mask(mask)
            if size is not None:
                check_same_size(values.shape, size, mask, image)
            counts = check_mask_values(values, job.num_classes, mask)
            classes = [c for c in range(1, job.num_classes) if counts[c]]
        except DataError as err:
            return problems + [Problem("bad-mask", str(err))]
        if job.given is not None and name in job.given:
            mismatch = label_mismatch(mask, classes, job.given[name])
            if mismatch:
                problems.append(Problem("label-mismatch", mismatch))
    elif job.need_masks:
        message = (
            f"mask {mask} of image {image} does not exist"
            if mask is not None
            else f"image {image} has no mask: {layout.root} has no mask folder"
        )
        return problems + [Problem("missing-mask", message)]
    elif xml is not None and xml.is_file():
        try:
            classes = xml_labels(xml, job.class_names)
        except DataError as err:
            return problems + [Problem("bad-annotation", str(err))]
    if job.given is not None:
        classes = job.given.get(name, classes)
    if classes is not None and not classes and job.need_masks:
        source = mask if mask is not None and mask.is_file() else "its annotations"
        problems.append(Problem("empty-labels", f"image {image} has no foreground class in "
                                                f"{source} (training leaves it out)"))  # fmt: skip
    return problems


def _check_in_worker(name: str) -> list[Problem]:
    return check_item(parallel.job(), name)


def _run_items(job: ItemCheck, names: list[str], workers: int) -> list[Problem]:
    """check_item over ``names``, in ``workers`` processes (which inherit the job), with a
    progress bar on a terminal."""
    bar = {"total": len(names), "unit": "img", "disable": None, "file": sys.stderr, "leave": False}
    workers = parallel.worker_count(workers, len(names), MIN_ITEMS_PER_WORKER)
    with parallel.mapped(_check_in_worker, job, names, workers, chunksize=32) as results:
        return [p for found in tqdm(results, **bar) for p in found]


def read_split_ids(layout: SegLayout, split: str, report: Report) -> list[str] | None:
    """The split's ids without repeats; split-file problems go to the report."""
    try:
        names, path = layout.split_ids(split)
    except DataError as err:
        report.add("split", str(err))
        return None
    if not names:
        report.add("split", f"split file {path} lists no image ids")
    duplicates = duplicate_ids(names)
    if duplicates:
        report.add("duplicate-ids", f"split file {path} repeats {len(duplicates)} id(s): "
                                    f"{', '.join(duplicates[:10])}")  # fmt: skip
    report.lines.append(f"  {split}: {len(names)} ids from {path}")
    return list(dict.fromkeys(names))


def check_split(
    layout: SegLayout,
    split: str,
    class_names: Sequence[str],
    report: Report,
    *,
    decode: bool,
    workers: int = 1,
    names: list[str] | None = None,
) -> None:
    """All checks of one split; with ``names`` given (an unprepared COCO subset), those ids'
    images only. Splits named test* need no masks."""
    need_masks = names is None and not split.startswith("test") and not layout.masks_optional
    if names is None:
        names = read_split_ids(layout, split, report)
        if names is None:
            return
    else:
        report.lines.append(f"  {split}: {len(names)} annotated ids (images only)")
    mask_dir = layout.mask_dir
    report.lines.append(
        f"    images in {layout.image_dir}, masks in {mask_dir if mask_dir else '(none)'}, "
        f"{'decoded' if decode else 'headers only'}"
    )
    job = ItemCheck(layout, len(class_names), tuple(class_names), need_masks, decode,
                    layout.annotation_labels())  # fmt: skip
    report.problems.extend(_run_items(job, names, workers))
    report.images += len(names)


def check_coco_subset(
    root: Path, prepared: Path, subset: str, report: Report, sample: int
) -> list[str] | None:
    """Annotation file, prepared-mask checksums and pre-converted agreement of one subset.

    Returns the labelled ids when the subset is not prepared yet (so its images can still be
    checked), else None.
    """
    ann = annotation_file(root, subset)
    if not ann.is_file():
        if not preconverted_dir(root, subset).is_dir():
            report.add("missing", f"{root} has neither {ann} nor pre-converted masks in "
                                  f"{preconverted_dir(root, subset)}")  # fmt: skip
        return None
    try:
        index = load_instances(ann, root / subset)
    except DataError as err:
        report.add("annotations", str(err))
        return None
    report.lines.append(f"  {subset}: {len(index.images)} images in {ann.name}, "
                        f"{len(index.labelled())} with annotations")  # fmt: skip
    if preconverted_dir(root, subset).is_dir():
        compared, problems = compare_preconverted(root, subset, sample, index)
        report.lines.append(f"    pre-converted masks: {compared - len(problems)}/{compared} "
                            "sampled agree with the annotations")  # fmt: skip
        for line in problems:
            report.add("disagreement", line)
    if is_prepared(root, prepared, subset):
        for line in verify_masks(prepared, subset):
            report.add("checksum", line)
        return None
    report.lines.append("    not prepared yet (training prepares it, or run python -m "
                        "datasets.coco prepare): checking its images only")  # fmt: skip
    return index.labelled()


def _layout_defaults(name: str) -> dict[str, int]:
    """The layout a default training run builds (the synthetic set it generates when no root
    is given, a tagged root's held-back fraction)."""
    from toco.build import layout_params
    from toco.config import TrainConfig

    return layout_params(TrainConfig(dataset=name))


def check_dataset(
    name: str,
    root: str | Path | None,
    splits: Sequence[str] | None = None,
    cache_dir: str | Path = ".cache",
    *,
    decode: bool = True,
    workers: int = 1,
    sample: int = 200,
) -> Report:
    """Check the splits of dataset ``name`` (default: its training and validation splits)."""
    spec = get_dataset_spec(name, root)
    splits = list(dict.fromkeys(splits or [spec.train_split, spec.val_split]))
    report = Report([f"{name} at {root or '(generated)'} ({spec.num_classes} classes)"])
    unprepared: dict[str, list[str] | None] = {}
    if name == "coco":
        if root is None:
            raise DataError("dataset 'coco' needs --data-root")
        root, prepared = Path(root), prepared_dir(root, cache_dir)
        for subset in dict.fromkeys(subset_of_split(s) for s in splits):
            unprepared[subset] = check_coco_subset(root, prepared, subset, report, sample)
    noted: set[str] = set()
    for split in splits:
        try:
            if name == "coco":
                layout = coco_layout(root, split, cache_dir, prepared, prepare=False)
                names = unprepared.get(layout.subset)
            else:
                layout = spec.make_layout(root, split, cache_dir, _layout_defaults(name))
                names = None
        except DataError as err:
            report.add("layout", str(err))
            continue
        check_split(layout, split, spec.class_names, report, decode=decode, workers=workers,
                    names=names)  # fmt: skip
        for note in layout.notes():
            if note not in noted:  # once, not once per split
                noted.add(note)
                report.lines.append(f"  note: {note}")
    return report


def format_report(report: Report, shown_per_kind: int = SHOWN_PER_KIND) -> str:
    lines = list(report.lines)
    kinds = Counter(p.kind for p in report.problems)
    if report.problems:
        lines.append("problems:")
        shown: Counter = Counter()
        for problem in report.problems:
            shown[problem.kind] += 1
            if shown[problem.kind] <= shown_per_kind:
                lines.append(f"  [{problem.kind}] {problem.message}")
        for kind, count in kinds.items():
            if count > shown_per_kind:
                lines.append(f"  ... and {count - shown_per_kind} more [{kind}] problem(s)")
    summary = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    verdict = f"FAILED: {len(report.problems)} problem(s): {summary}" if report.problems else "OK"
    lines.append(f"{report.images} image(s) checked; {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from datasets import DATASETS
    from toco.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m datasets.check", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data-root", help="dataset root (synthetic: generated when unset)")
    parser.add_argument("--splits", nargs="+", help="splits to check (default: the dataset's "
                        "training and validation splits)")  # fmt: skip
    parser.add_argument("--cache-dir", default=".cache", help="where prepared data lives")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="read image headers only (the start-up checks), no full decode",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes checking images")
    parser.add_argument("--sample", type=int, default=200, help="COCO: pre-converted masks "
                        "compared with the annotations per subset (0 = all)")  # fmt: skip
    parser.add_argument(
        "--show", type=int, default=SHOWN_PER_KIND, help="problems printed per kind"
    )
    args = parser.parse_args(argv)
    report = check_dataset(
        args.dataset,
        args.data_root,
        args.splits,
        args.cache_dir,
        decode=not args.quick,
        workers=args.workers,
        sample=args.sample,
    )
    print(format_report(report, args.show))
    return 1 if report.problems else 0


if __name__ == "__main__":
    from toco.cli import run_cli

    sys.exit(run_cli(lambda: main()))
