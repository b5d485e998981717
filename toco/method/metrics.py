"""Dataset-level segmentation metrics from a confusion matrix (S6.4 in docs/fidelity.md)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor


class ConfusionMatrix:
    """Pixel confusion counts accumulated over a dataset.

    matrix[g, p] counts pixels with ground truth g and prediction p (rows = gt, cols = pred).
    Pixels whose gt is outside 0..C-1 (e.g. 255) are ignored. A prediction outside 0..C-1 (e.g.
    255 in a pseudo label) counts as wrong for its gt class: it is tallied in invalid_pred[g], so
    it enlarges that class's IoU denominator but appears in no column. To reduce across
    processes use all_reduce_(), which reduces both tensors.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.invalid_pred = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Add the pixels of pred and gt (any equal shapes, integer labels)."""
        if pred.shape != gt.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ in shape")
        c = self.num_classes
        gt = gt.reshape(-1).to(device=pred.device, dtype=torch.int64)
        pred = pred.reshape(-1).to(torch.int64)
        # Ignored gt goes to an extra row c and out-of-range predictions to an extra column c
        # (split off into invalid_pred); no boolean indexing, so no host sync beyond bincount's.
        bad_gt = (gt < 0) | (gt >= c) | (gt == self.ignore_index)
        gt = gt.masked_fill(bad_gt, c)
        pred = pred.masked_fill((pred < 0) | (pred >= c), c)
        counts = torch.bincount(gt * (c + 1) + pred, minlength=(c + 1) ** 2).reshape(c + 1, c + 1)
        counts = counts[:c].to(self.matrix.device)
        self.matrix += counts[:, :c]
        self.invalid_pred += counts[:, c]

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts into this one (in place) and return self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix.to(self.matrix.device)
        self.invalid_pred += other.invalid_pred.to(self.matrix.device)
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def all_reduce_(self, group: object = None) -> "ConfusionMatrix":
        """Sum the counts over torch.distributed processes (no-op when not initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            flat = torch.cat([self.matrix.reshape(-1), self.invalid_pred])
            dist.all_reduce(flat, group=group)
            c = self.num_classes
            self.matrix.copy_(flat[: c * c].reshape(c, c))
            self.invalid_pred.copy_(flat[c * c :])
        return self

    def reset(self) -> None:
        self.matrix.zero_()
        self.invalid_pred.zero_()

    def gt_count(self) -> Tensor:
        """GT_c: pixels of each gt class (including those with an invalid prediction)."""
        return self.matrix.sum(dim=1) + self.invalid_pred

    def iou(self) -> Tensor:
        """IoU_c = TP / (GT_c + Pred_c - TP), float64 (C,), NaN for classes without gt pixels."""
        m = self.matrix.to(torch.float64)
        tp = m.diagonal()
        gt = self.gt_count().to(torch.float64)
        union = gt + m.sum(dim=0) - tp
        iou = tp / union.clamp_min(1)
        return torch.where(gt > 0, iou, torch.full_like(iou, math.nan))

    def miou(self) -> float:
        """Mean IoU in percent over classes with gt pixels (NaN if there are none)."""
        return float(torch.nanmean(self.iou()).item() * 100.0)

    def pixel_accuracy(self) -> float:
        """Correct pixels / valid-gt pixels, in percent (NaN if there are none)."""
        total = int(self.gt_count().sum().item())
        if total == 0:
            return math.nan
        return 100.0 * int(self.matrix.diagonal().sum().item()) / total


def format_iou_table(
    class_names: Sequence[str],
    columns: Mapping[str, Tensor],
    decimals: int = 2,
    mean_name: str = "mIoU",
) -> str:
    """Aligned text table of per-class IoUs (fractions, shown in percent) and their mean.

    One row per class, one column per named IoU vector; '-' marks NaN (class without gt). The
    final row is the nanmean over classes with gt, as ConfusionMatrix.miou().
    """
    names = list(class_names)
    cells: dict[str, list[str]] = {}
    for title, vec in columns.items():
        vec = vec.detach().to("cpu", torch.float64).reshape(-1)
        if vec.numel() != len(names):
            raise ValueError(f"column {title!r} has {vec.numel()} values for {len(names)} classes")
        values = [float(v) * 100.0 for v in vec] + [float(torch.nanmean(vec)) * 100.0]
        cells[title] = ["-" if math.isnan(v) else f"{v:.{decimals}f}" for v in values]
    rows = names + [mean_name]
    first = max(len("class"), *(len(r) for r in rows))
    widths = {t: max(len(t), *(len(x) for x in col)) for t, col in cells.items()}

    def line(label: str, values: list[str]) -> str:
        body = " | ".join(v.rjust(widths[t]) for t, v in zip(cells, values))
        return f"| {label.ljust(first)} | {body} |" if body else f"| {label.ljust(first)} |"

    header = line("class", list(cells))
    rule = "|" + "|".join("-" * (n + 2) for n in [first, *widths.values()]) + "|"
    body = [line(r, [cells[t][i] for t in cells]) for i, r in enumerate(rows)]
    return "\n".join([header, rule, *body[:-1], rule, body[-1]])
