"""Datasets from a TrainConfig: the one place where config fields meet the dataset builders."""
from __future__ import annotations

from typing import Any

import datasets
from datasets import DatasetSpec, VOCEvalDataset, VOCTrainDataset
from datasets.voc import seed_worker
from toco.config import TrainConfig

__all__ = ["dataset_spec", "train_dataset", "eval_dataset", "layout_params", "seed_worker"]


def layout_params(cfg: TrainConfig) -> dict[str, Any]:
    """What the dataset's layout is built with: the generated set's size, or a tagged root's
    held-back fraction."""
    if cfg.dataset == "tags":
        return {"val_fraction": cfg.val_fraction}
    return {"num_train": cfg.synthetic_train, "num_val": cfg.synthetic_val, "seed": 0}


def dataset_spec(cfg: TrainConfig) -> DatasetSpec:
    """The dataset's spec; a tagged root's class names are read from cfg.data_root."""
    return datasets.get_dataset_spec(cfg.dataset, cfg.data_root)


def train_dataset(cfg: TrainConfig) -> VOCTrainDataset:
    return datasets.build_train_dataset(
        cfg.dataset, cfg.data_root, cfg.train_split, cfg.crop_size, cfg.cache_dir,
        scale_range=tuple(cfg.scale_range),
        align_local_flip=cfg.local_view_flip == "aligned",  # "independent": reference bug B2
        skip_bad_images=cfg.skip_bad_images, synthetic_params=layout_params(cfg),
        label_source=cfg.image_labels)


def eval_dataset(cfg: TrainConfig, split: str | None, with_masks: bool | None = True
                 ) -> VOCEvalDataset:
    """with_masks=None: masks where the split has them (see datasets.build_eval_dataset)."""
    return datasets.build_eval_dataset(cfg.dataset, cfg.data_root, split, cfg.cache_dir,
                                       with_masks=with_masks,
                                       synthetic_params=layout_params(cfg),
                                       label_source=cfg.image_labels)
