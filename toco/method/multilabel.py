"""Image-level (multi-label) classification scores: average precision and F1, in percent."""

from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall steps of one class (sklearn's definition).

    Images are taken in decreasing score order; tied scores enter together (one threshold).
    AP = sum over thresholds of (recall gain) x (precision there). NaN without a positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    positives = int(targets.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    # Last index of every group of equal scores: one threshold per distinct score.
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(targets)[last]
    precision = true_pos / (last + 1)
    recall_gain = np.diff(np.r_[0, true_pos]) / positives
    return float((recall_gain * precision).sum())


def multilabel_scores(
    scores: np.ndarray, targets: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """mAP and F1 of (N, K) probabilities against (N, K) 0/1 labels, in percent.

    map: mean AP over classes with a positive image. f1: macro F1 (2TP / (2TP + FP + FN) per
    class, averaged over classes that have a positive or a prediction). f1_micro: F1 of the
    summed counts. A prediction is a probability >= threshold. NaN where nothing counts.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must be (N, K)")
    aps = [
        average_precision(scores[:, k], targets[:, k])
        for k in range(scores.shape[1])
        if targets[:, k].any()
    ]
    predicted = scores >= threshold
    tp = (predicted & targets).sum(0)
    fp = (predicted & ~targets).sum(0)
    fn = (~predicted & targets).sum(0)
    counted = (tp + fp + fn) > 0
    per_class = 2 * tp[counted] / (2 * tp[counted] + fp[counted] + fn[counted])
    micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "map": float(np.mean(aps) * 100) if aps else float("nan"),
        "f1": float(per_class.mean() * 100) if counted.any() else float("nan"),
        "f1_micro": float(2 * tp.sum() / micro_den * 100) if micro_den else float("nan"),
    }
