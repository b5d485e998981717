"""Dataset registry: every dataset is a VOC-style tree read by the same loaders.

A dataset differs only by data (class names, default splits, how its root maps onto a
``SegLayout``), so adding one is a new ``DatasetSpec`` entry, not new loader code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from datasets.coco_annotations import COCO_CLASSES
from datasets.layout import SegLayout, VOCLayout
from datasets.synthetic import SYNTHETIC_CLASSES, ensure_synthetic
from datasets.voc import VOC_CLASSES, VOCEvalDataset, VOCTrainDataset
from toco.errors import ConfigError

# (root or None, split, cache_dir or None, synthetic params) -> layout of that split
LayoutFactory = Callable[[Path | None, str, Path | None, dict[str, Any]], SegLayout]


def _voc_layout(
    root: Path | None, split: str, cache_dir: Path | None, params: dict[str, Any]
) -> SegLayout:
    return VOCLayout(root)


def _synthetic_layout(
    root: Path | None, split: str, cache_dir: Path | None, params: dict[str, Any]
) -> SegLayout:
    if root is None:
        if cache_dir is None:
            raise ConfigError("dataset 'synthetic' is generated into cache_dir, which is not set")
        root = ensure_synthetic(Path(cache_dir), **params)
    return VOCLayout(root, shipped_splits=None)


def _coco_layout(
    root: Path | None, split: str, cache_dir: Path | None, params: dict[str, Any]
) -> SegLayout:
    from datasets.coco import coco_layout  # not at import: `python -m datasets.coco` runs it

    return coco_layout(root, split, cache_dir)


def _tags_layout(
    root: Path | None, split: str, cache_dir: Path | None, params: dict[str, Any]
) -> SegLayout:
    from datasets.tags import DEFAULT_VAL_FRACTION, tags_layout

    return tags_layout(root, cache_dir, params.get("val_fraction", DEFAULT_VAL_FRACTION))


def _tags_classes(root: Path) -> tuple[str, ...]:
    from datasets.tags import class_names_of

    return class_names_of(root)


@dataclass(frozen=True)
class DatasetSpec:
    """What the engine needs to know about a dataset.

    Args:
        name: registry key.
        class_names: all C classes, 'background' first.
        train_split: default training split.
        val_split: default evaluation split.
        layout: builds the layout of a split from the root, the cache folder and generator
            parameters (a VOC tree by default).
        generated: the root is generated under the cache folder when none is given.
        default_recipe: a file in configs/ whose settings become the defaults when this
            dataset is chosen (a recipe given with --config and flags still override them).
        classes_from_root: reads the class names from the root (a tagged collection brings
            its own); ``class_names`` is then empty until ``for_root`` fills it.
    """

    name: str
    class_names: tuple[str, ...]
    train_split: str
    val_split: str
    layout: LayoutFactory = _voc_layout
    generated: bool = False
    default_recipe: str | None = None
    classes_from_root: Callable[[Path], tuple[str, ...]] | None = None

    def for_root(self, root: str | Path | None) -> "DatasetSpec":
        """The spec with the class names of ``root`` where the dataset takes them from there."""
        if self.classes_from_root is None:
            return self
        if root is None:
            raise ConfigError(
                f"dataset {self.name!r} takes its class names from its root "
                "folder (data root is not set)"
            )
        return replace(self, class_names=self.classes_from_root(Path(root)))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def make_layout(
        self,
        root: str | Path | None,
        split: str,
        cache_dir: str | Path | None,
        synthetic_params: dict[str, Any] | None = None,
    ) -> SegLayout:
        if root is None and not self.generated:
            raise ConfigError(f"dataset {self.name!r} needs a root folder (data root is not set)")
        return self.layout(Path(root) if root is not None else None, split,
                           Path(cache_dir) if cache_dir is not None else None,
                           synthetic_params or {})  # fmt: skip


DATASETS: dict[str, DatasetSpec] = {
    "voc": DatasetSpec(
        "voc",
        VOC_CLASSES,
        train_split="train_aug",
        val_split="val",
        default_recipe="voc_vit_b.yaml",
    ),
    "coco": DatasetSpec(
        "coco",
        COCO_CLASSES,
        train_split="train",
        val_split="val_part",
        layout=_coco_layout,
        default_recipe="coco_vit_b.yaml",
    ),
    "synthetic": DatasetSpec(
        "synthetic",
        SYNTHETIC_CLASSES,
        train_split="train",
        val_split="val",
        layout=_synthetic_layout,
        generated=True,
        default_recipe="synthetic.yaml",
    ),
    "tags": DatasetSpec(
        "tags",
        (),
        train_split="train",
        val_split="val",
        layout=_tags_layout,
        classes_from_root=_tags_classes,
    ),
}


def get_dataset_spec(name: str, root: str | Path | None = None) -> DatasetSpec:
    """The spec of ``name``; datasets whose classes come from their root read them from
    ``root`` (without a root their ``class_names`` stay empty)."""
    try:
        spec = DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None
    return spec.for_root(root) if root is not None else spec


def build_train_dataset(
    name: str,
    root: str | Path | None,
    split: str | None,
    crop_size: int,
    cache_dir: str | Path | None,
    *,
    scale_range: tuple[float, float] = (0.5, 2.0),
    align_local_flip: bool = True,
    photometric: bool = True,
    skip_bad_images: bool = False,
    synthetic_params: dict[str, Any] | None = None,
    label_source: str = "masks",
) -> VOCTrainDataset:
    """Training dataset ``name``; ``split=None`` picks the dataset's default training split."""
    spec = get_dataset_spec(name).for_root(root)
    split = split or spec.train_split
    return VOCTrainDataset(
        spec.make_layout(root, split, cache_dir, synthetic_params),
        split,
        num_classes=spec.num_classes,
        crop_size=crop_size,
        scale_range=scale_range,
        cache_dir=cache_dir,
        align_local_flip=align_local_flip,
        photometric=photometric,
        skip_bad_images=skip_bad_images,
        class_names=spec.class_names,
        label_source=label_source,
    )


def build_eval_dataset(
    name: str,
    root: str | Path | None,
    split: str | None,
    cache_dir: str | Path | None,
    *,
    with_masks: bool | None = True,
    synthetic_params: dict[str, Any] | None = None,
    label_source: str = "masks",
) -> VOCEvalDataset:
    """Evaluation dataset ``name``; ``split=None`` picks the dataset's default eval split.

    ``with_masks=None``: with masks where the layout has them for the split (a tagged
    collection may have none), else as given."""
    spec = get_dataset_spec(name).for_root(root)
    split = split or spec.val_split
    layout = spec.make_layout(root, split, cache_dir, synthetic_params)
    if with_masks is None:
        with_masks = layout.split_has_masks(split)
    return VOCEvalDataset(
        layout,
        split,
        num_classes=spec.num_classes,
        cache_dir=cache_dir,
        with_masks=with_masks,
        class_names=spec.class_names,
        label_source=label_source,
    )


__all__ = [
    "DATASETS",
    "DatasetSpec",
    "VOCEvalDataset",
    "VOCTrainDataset",
    "build_eval_dataset",
    "build_train_dataset",
    "get_dataset_spec",
]
