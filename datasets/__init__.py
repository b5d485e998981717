"""Dataset registry: every dataset is a VOC-style tree read by the same loaders.

A dataset differs only by data (class names, default splits, where its root comes from), so
adding one is a new ``DatasetSpec`` entry, not new loader code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets.synthetic import SYNTHETIC_CLASSES, ensure_synthetic
from datasets.voc import VOC_CLASSES, VOCEvalDataset, VOCTrainDataset
from toco.errors import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    """What the engine needs to know about a dataset.

    Args:
        name: registry key.
        class_names: all C classes, 'background' first.
        train_split: default training split.
        val_split: default evaluation split.
        generated: the root is generated under the cache folder when none is given.
    """

    name: str
    class_names: tuple[str, ...]
    train_split: str
    val_split: str
    generated: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetSpec] = {
    "voc": DatasetSpec("voc", VOC_CLASSES, train_split="train_aug", val_split="val"),
    "synthetic": DatasetSpec(
        "synthetic", SYNTHETIC_CLASSES, train_split="train", val_split="val", generated=True
    ),
}


def get_dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None


def resolve_root(
    spec: DatasetSpec,
    root: str | Path | None,
    cache_dir: str | Path | None,
    synthetic_params: dict[str, Any] | None = None,
) -> Path:
    """The given root, or for generated datasets the generated folder under ``cache_dir``."""
    if root is not None:
        return Path(root)
    if not spec.generated:
        raise ConfigError(f"dataset {spec.name!r} needs a root folder (data root is not set)")
    if cache_dir is None:
        raise ConfigError(f"dataset {spec.name!r} is generated into cache_dir, which is not set")
    return ensure_synthetic(Path(cache_dir), **(synthetic_params or {}))


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
    synthetic_params: dict[str, Any] | None = None,
) -> VOCTrainDataset:
    """Training dataset ``name``; ``split=None`` picks the dataset's default training split."""
    spec = get_dataset_spec(name)
    return VOCTrainDataset(
        resolve_root(spec, root, cache_dir, synthetic_params),
        split or spec.train_split,
        num_classes=spec.num_classes,
        crop_size=crop_size,
        scale_range=scale_range,
        cache_dir=cache_dir,
        align_local_flip=align_local_flip,
        photometric=photometric,
    )


def build_eval_dataset(
    name: str,
    root: str | Path | None,
    split: str | None,
    cache_dir: str | Path | None,
    *,
    with_masks: bool = True,
    synthetic_params: dict[str, Any] | None = None,
) -> VOCEvalDataset:
    """Evaluation dataset ``name``; ``split=None`` picks the dataset's default eval split."""
    spec = get_dataset_spec(name)
    return VOCEvalDataset(
        resolve_root(spec, root, cache_dir, synthetic_params),
        split or spec.val_split,
        num_classes=spec.num_classes,
        cache_dir=cache_dir,
        with_masks=with_masks,
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
