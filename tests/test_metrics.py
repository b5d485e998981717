"""Confusion matrix, IoU and the IoU table (S6.4) against brute-force pixel counts."""

import math

import numpy as np
import pytest
import torch

from toco.method.metrics import ConfusionMatrix, format_iou_table


def brute_force(pred, gt, c, ignore=255):
    """(matrix, gt_count) with explicit loops; an invalid prediction still counts for its gt."""
    mat = [[0] * c for _ in range(c)]
    gt_count = [0] * c
    for p, g in zip(pred.reshape(-1).tolist(), gt.reshape(-1).tolist()):
        if not 0 <= g < c or g == ignore:
            continue
        gt_count[g] += 1
        if 0 <= p < c:
            mat[g][p] += 1
    return mat, gt_count


def brute_miou(mat, gt_count):
    c = len(mat)
    ious = []
    for k in range(c):
        if gt_count[k] == 0:
            ious.append(math.nan)
            continue
        pred_k = sum(mat[g][k] for g in range(c))
        ious.append(mat[k][k] / (gt_count[k] + pred_k - mat[k][k]))
    valid = [v for v in ious if not math.isnan(v)]
    return ious, 100 * sum(valid) / len(valid)


def random_case(seed, c=5, shape=(3, 7, 9)):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, c, shape, generator=g)
    gt[gt == 3] = 2  # class 3 absent from the gt
    gt[torch.rand(shape, generator=g) < 0.15] = 255  # ignored pixels
    pred = torch.randint(0, c, shape, generator=g)
    pred[torch.rand(shape, generator=g) < 0.1] = 255  # invalid predictions (pseudo-label ignore)
    return pred, gt


def test_matrix_iou_miou_match_brute_force():
    c = 5
    cm = ConfusionMatrix(c)
    preds, gts = [], []
    for seed in range(3):
        pred, gt = random_case(seed, c)
        cm.update(pred, gt)
        preds.append(pred.reshape(-1))
        gts.append(gt.reshape(-1))
    mat, gt_count = brute_force(torch.cat(preds), torch.cat(gts), c)
    assert cm.matrix.dtype == torch.int64 and cm.matrix.shape == (c, c)
    assert cm.matrix.tolist() == mat
    ious, miou = brute_miou(mat, gt_count)
    got = cm.iou()
    assert got.dtype == torch.float64
    assert math.isnan(got[3].item()) and math.isnan(ious[3])  # absent class: NaN
    np.testing.assert_allclose(got.numpy(), ious, rtol=1e-12)
    assert cm.miou() == pytest.approx(miou, rel=1e-12)
    total = sum(gt_count)
    assert cm.pixel_accuracy() == pytest.approx(100 * sum(mat[k][k] for k in range(c)) / total)


def test_invalid_prediction_counts_as_wrong():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 255, 1, 1]), torch.tensor([0, 0, 1, 255]))
    # class 0: TP 1, GT 2 (one predicted 255), Pred 1 -> 1/2; class 1: 1/1
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    assert cm.iou().tolist() == [0.5, 1.0]
    assert cm.miou() == pytest.approx(75.0)
    assert cm.pixel_accuracy() == pytest.approx(100 * 2 / 3)


def test_class_without_gt_but_with_predictions_is_nan_and_excluded():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 2], [1, 1]]), torch.tensor([[0, 0], [1, 1]]))
    iou = cm.iou()
    assert iou[0].item() == 0.5 and iou[1].item() == 1.0 and math.isnan(iou[2].item())
    assert cm.miou() == pytest.approx(75.0)


def test_merge_and_iadd_equal_single_accumulation():
    pred_a, gt_a = random_case(10)
    pred_b, gt_b = random_case(11)
    whole = ConfusionMatrix(5)
    whole.update(torch.cat([pred_a, pred_b]), torch.cat([gt_a, gt_b]))
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred_a, gt_a)
    b.update(pred_b, gt_b)
    a += b
    assert torch.equal(a.matrix, whole.matrix) and torch.equal(a.invalid_pred, whole.invalid_pred)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))
    with pytest.raises(ValueError):
        a.update(torch.zeros(3), torch.zeros(4))


def test_format_iou_table():
    cols = {
        "CAM": torch.tensor([0.5, 0.25, math.nan], dtype=torch.float64),
        "Seg_Pred": torch.tensor([1.0, 0.123456, math.nan], dtype=torch.float64),
    }
    text = format_iou_table(["background", "cat", "dog"], cols)
    lines = text.splitlines()
    rows = {
        line.split("|")[1].strip(): [x.strip() for x in line.split("|")[2:-1]]
        for line in lines
        if "---" not in line
    }
    assert rows["class"] == ["CAM", "Seg_Pred"]
    assert rows["background"] == ["50.00", "100.00"]
    assert rows["cat"] == ["25.00", "12.35"]
    assert rows["dog"] == ["-", "-"]
    assert rows["mIoU"] == ["37.50", "56.17"]  # nanmean over classes with gt
    assert len({len(line) for line in lines}) == 1  # aligned
