"""The run's picture: a grid of validation images with what the model makes of each.

One row per image: the input, its ground truth, the CAM heat-map (the image's classes, blended
over the input), the training rule's pseudo label (multi-scale CAM -> thresholds -> PAR; cream
= uncertain) and the decoder's prediction, above a legend of the class colours. The images are
a fixed choice from the validation split (see `pick_images`), so the previews of successive
validations and of different runs show the same images.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from toco.atomic import write_bytes_atomic
from toco.evaluation.pseudo import IGNORE, pseudo_labels
from toco.method.inference import class_score_map, predict_cams, predict_seg_logits
from toco.method.par import PAR
from toco.visualize import blend, grid, heatmap, legend, stack

COLUMNS = ("input", "ground truth", "CAM", "pseudo label", "prediction")


def dataset_classes(dataset) -> list[list[int]]:
    """The foreground class ids (1..C-1) of each image of an evaluation dataset."""
    return [[int(c) + 1 for c in np.flatnonzero(dataset.labels[n])] for n in dataset.names]


def pick_images(labels: Sequence[Sequence[int]], count: int) -> list[int]:
    """`count` dataset indices that together show as many classes as possible.

    Greedy: each pick is the first image (in split order) adding the most classes not shown
    yet; once every class is shown, the remaining picks are the first unused images.
    labels: the foreground class ids of each image.
    """
    shown: set[int] = set()
    picked: list[int] = []
    for _ in range(min(count, len(labels))):
        gains = [(len(set(lab) - shown), -i) for i, lab in enumerate(labels) if i not in picked]
        gain, neg_index = max(gains)
        picked.append(-neg_index)
        shown |= set(labels[-neg_index])
    return picked


@torch.no_grad()
def preview_rows(
    model, samples: Sequence[dict], cfg, device: torch.device, size: int, autocast=None
) -> list[list[np.ndarray]]:
    """The five panels of each sample (a dataset item: uint8 image, mask, cls_label)."""
    par = PAR(cfg.par_iters, cfg.par_dilations).to(device)
    was_training = model.training
    model.eval()
    rows = []
    for sample in samples:
        image = sample["image"][None].to(device).float().div(255)
        cls_label = sample["cls_label"][None].to(device).float()
        with (autocast or contextlib.nullcontext)():
            cam, _ = predict_cams(model, image, cfg.val_scales, flip=True, size=size)
            seg = predict_seg_logits(model, image, size=size).float().argmax(1)
            pseudo = pseudo_labels(model, image, cls_label, cfg, par, size=size, use_aux_cam=False)
        picture = sample["image"].permute(1, 2, 0).numpy()
        truth = (
            sample["mask"].numpy().astype(np.uint8)
            if "mask" in sample
            else np.full(picture.shape[:2], IGNORE, np.uint8)
        )  # no mask: all unknown
        rows.append(
            [
                picture,
                truth,
                blend(picture, heatmap(class_score_map(cam.float(), cls_label)[0]), 0.6),
                pseudo[0].cpu().numpy().astype(np.uint8),
                seg[0].cpu().numpy().astype(np.uint8),
            ]
        )
    model.train(was_training)
    return rows


def write_preview(
    path: Path,
    rows: Sequence[Sequence[np.ndarray]],
    names: Sequence[str],
    class_names: Sequence[str],
    title: str,
) -> Path:
    """Compose the grid with its legend and write it atomically as a PNG."""
    shown = sorted(
        {int(v) for row in rows for panel in (row[1], row[3], row[4]) for v in np.unique(panel)}
    )
    labels = [v for v in shown if v < len(class_names)] + ([IGNORE] if IGNORE in shown else [])
    body = grid(rows, COLUMNS, row_titles=names, title=title)
    picture = stack([body, legend(class_names, labels, width=body.width)])
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
    return path


def run_preview(
    model,
    dataset,
    indices: Sequence[int],
    cfg,
    device: torch.device,
    size: int,
    path: Path,
    class_names: Sequence[str],
    title: str,
    autocast=None,
) -> Optional[Path]:
    """Render and write the preview of `dataset[i] for i in indices`; None if there are none."""
    if not indices:
        return None
    samples = [dataset[i] for i in indices]
    rows = preview_rows(model, samples, cfg, device, size, autocast)
    return write_preview(path, rows, [str(s["name"]) for s in samples], class_names, title)
