"""CAM post-processing and pseudo labels (spec 2.1-2.3, 2.5) against hand values and naive loops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toco.method.cam import (
    box_mask,
    box_to_grid,
    cam_to_label,
    cam_to_roi_mask,
    multi_scale_cam,
    refine_cams_with_bkg,
)
from toco.method.par import PAR


class ToyCam:
    """Per-sample raw CAMs at stride 4 that are NOT flip-symmetric (a horizontal ramp)."""

    def __init__(self, num_fg: int = 3):
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(num_fg, 3, generator=g, dtype=torch.float64)
        self.w_aux = torch.randn(num_fg, 3, generator=g, dtype=torch.float64)
        self.batch_sizes: list[int] = []

    def __call__(self, x):
        self.batch_sizes.append(x.shape[0])
        f = F.avg_pool2d(x, 4)
        ramp = torch.linspace(-1, 1, f.shape[-1], dtype=f.dtype)
        cam = torch.einsum("kc,nchw->nkhw", self.w, f) + ramp
        aux = torch.einsum("kc,nchw->nkhw", self.w_aux, f) - 2 * ramp
        return cam, aux


def naive_multi_scale(cam_fn, images, scales, flip):
    """One image, one scale and one flip at a time; the normalisation with explicit loops."""
    b, _, h, w = images.shape
    out = []
    for which in range(2):
        total = torch.zeros(b, cam_fn.w.shape[0], h, w, dtype=torch.float64)
        for s in [1.0] + [s for s in scales if s != 1.0]:
            for i in range(b):
                x = images[i : i + 1]
                if s != 1.0:
                    x = F.interpolate(
                        x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False
                    )
                m = F.interpolate(
                    cam_fn(x)[which], size=(h, w), mode="bilinear", align_corners=False
                )
                if flip:
                    mf = F.interpolate(
                        cam_fn(x.flip(-1))[which], size=(h, w), mode="bilinear", align_corners=False
                    )
                    m = torch.maximum(m, mf.flip(-1))
                total[i] += m[0].clamp_min(0)
        for i in range(b):
            for k in range(total.shape[1]):
                total[i, k] -= total[i, k].min()
                total[i, k] /= total[i, k].max() + 1e-5
        out.append(total)
    return out


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("scales", [(1.0, 0.5, 1.5), (0.5, 1.5)])
def test_multi_scale_cam_matches_naive(flip, scales):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    fn = ToyCam()
    cam, aux = multi_scale_cam(fn, images, scales, flip=flip)
    # One call per scale (1.0 included even when not listed), flip pair in the same call.
    assert fn.batch_sizes == [4 if flip else 2] * 3
    ref_cam, ref_aux = naive_multi_scale(ToyCam(), images, scales, flip)
    torch.testing.assert_close(cam, ref_cam, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-10, atol=1e-12)
    assert cam.min() == 0 and cam.max() < 1


def test_multi_scale_cam_flip_changes_result_and_no_grad():
    images = torch.randn(1, 3, 16, 16, requires_grad=True)
    fn = ToyCam()
    fn.w = fn.w.float()
    fn.w_aux = fn.w_aux.float()
    a, _ = multi_scale_cam(fn, images, (1.0,), flip=True)
    b, _ = multi_scale_cam(fn, images, (1.0,), flip=False)
    assert not a.requires_grad
    assert not torch.allclose(a, b)


def test_cam_to_label_hand_example():
    cam = torch.tensor(
        [
            [
                [[0.9, 0.6, 0.2], [0.1, 0.3, 0.5]],
                [[0.8, 0.7, 0.1], [0.95, 0.4, 0.2]],
                [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
            ]
        ]
    )  # (1, 3, 2, 3); class 2 is absent
    y = torch.tensor([[1.0, 1.0, 0.0]])
    valid, label = cam_to_label(cam, y, bkg_thre=0.5)
    assert torch.equal(valid[0, 2], torch.zeros(2, 3))
    assert label.tolist() == [[[1, 2, 0], [2, 0, 0]]]
    _, label = cam_to_label(cam, y, ignore_mid=True, high_thre=0.7, low_thre=0.25)
    # 0.9 -> 1; 0.7 (== high) -> ignore; 0.2 -> 0; 0.95 -> 2; 0.4 -> ignore; 0.5 -> ignore
    assert label.tolist() == [[[1, 255, 0], [2, 255, 255]]]
    box = torch.tensor([[0, 1, 1, 3]])
    _, label = cam_to_label(cam, y, img_box=box, ignore_mid=True, high_thre=0.7, low_thre=0.25)
    assert label.tolist() == [[[255, 255, 0], [255, 255, 255]]]
    assert label.dtype == torch.long


@pytest.mark.parametrize("ignore_mid", [False, True])
def test_cam_to_label_matches_naive_loops(ignore_mid):
    torch.manual_seed(1)
    b, k, h, w = 3, 4, 7, 9
    cam = torch.rand(b, k, h, w)
    y = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float32)
    box = torch.tensor([[1, 6, 0, 9], [0, 7, 2, 5], [3, 3, 0, 9]])  # last one is empty
    valid, label = cam_to_label(
        cam, y, box, bkg_thre=0.45, high_thre=0.65, low_thre=0.3, ignore_mid=ignore_mid
    )
    c, yv = cam.numpy(), y.numpy()
    for i in range(b):
        for r in range(h):
            for q in range(w):
                vals = [c[i, j, r, q] * yv[i, j] for j in range(k)]
                v = max(vals)
                lab = vals.index(v) + 1
                if ignore_mid:
                    lab = lab if v > 0.65 else (255 if v > 0.3 else 0)
                elif v <= 0.45:
                    lab = 0
                y0, y1, x0, x1 = box[i].tolist()
                if not (y0 <= r < y1 and x0 <= q < x1):
                    lab = 255
                assert label[i, r, q] == lab, (i, r, q)
                assert np.allclose(valid[i, :, r, q].numpy(), vals)


def test_box_mask_and_box_to_grid():
    m = box_mask(torch.tensor([[1, 3, 0, 2]]), 4, 3)
    assert m.int().tolist() == [[[0, 0, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]]]
    box = torch.tensor([[0, 448, 0, 448], [10, 300, 17, 431], [32, 448, 0, 400]], dtype=torch.int16)
    grid = box_to_grid(box, 16)
    assert grid.dtype == torch.int16
    assert grid.tolist() == [[0, 28, 0, 28], [0, 19, 1, 27], [2, 28, 0, 25]]
    assert box_to_grid(box.float(), 16).tolist() == [[0, 28, 0, 28], [0, 19, 1, 27], [2, 28, 0, 25]]


def test_cam_to_roi_mask_thresholds_and_absent_classes():
    cam = torch.tensor(
        [[[[0.25, 0.26, 0.75, 0.74]], [[0.0, 0.0, 0.0, 0.0]], [[0.9, 0.9, 0.9, 0.9]]]]
    )  # class 2 absent: its 0.9 must not count
    y = torch.tensor([[1.0, 1.0, 0.0]])
    roi = cam_to_roi_mask(cam, y, low_thre=0.25, high_thre=0.75)
    assert roi.tolist() == [[[0, 1, 2, 1]]]
    assert roi.dtype == torch.int16 and roi.shape == (1, 1, 4)


def naive_refine(par, images, cams, cls_label, img_box, high, low, down_scale, ignore_index=255):
    """Spec 2.5 literally: per image, per stack, slice the valid channels."""
    b, _, h, w = images.shape
    size = (h // down_scale, w // down_scale)
    out = torch.full((b, h, w), ignore_index, dtype=torch.long)
    for i in range(b):
        img = F.interpolate(images[i : i + 1], size=size, mode="bilinear", align_corners=False)
        keys = [0] + [j + 1 for j in range(cls_label.shape[1]) if cls_label[i, j] > 0]
        labels = []
        for thre in (high, low):
            stack = torch.cat([torch.full_like(cams[i : i + 1, :1], thre), cams[i : i + 1]], dim=1)
            stack = F.interpolate(stack, size=size, mode="bilinear", align_corners=False)
            probs = torch.softmax(stack[:, keys], dim=1)
            ref = F.interpolate(par(img, probs), size=(h, w), mode="bilinear", align_corners=False)
            idx = ref[0].argmax(0)
            lab = torch.full((h, w), ignore_index, dtype=torch.long)
            y0, y1, x0, x1 = img_box[i].tolist() if img_box is not None else (0, h, 0, w)
            lab[y0:y1, x0:x1] = torch.tensor(keys)[idx][y0:y1, x0:x1]
            labels.append(lab)
        lab_h, lab_l = labels
        lab = lab_h.clone()
        lab[lab_h == 0] = ignore_index
        lab[(lab_h == 0) & (lab_l == 0)] = 0
        out[i] = lab
    return out


@pytest.mark.parametrize("use_box,par", [(True, PAR(3, (1, 2, 4))), (False, PAR())])
def test_refine_cams_with_bkg_matches_per_image_reference(use_box, par):
    torch.manual_seed(2)
    b, k, h, w = 3, 5, 24, 28
    images = torch.rand(b, 3, h, w, dtype=torch.float64)
    # Smooth random CAMs so refinement produces all three outcomes.
    cams = F.interpolate(torch.rand(b, k, 4, 4, dtype=torch.float64), size=(h, w), mode="bilinear")
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 0, 1, 1]], dtype=torch.float32)
    cams = cams * y[:, :, None, None].double()  # as the reference feeds the masked `valid` CAM
    box = torch.tensor([[0, 24, 0, 28], [2, 20, 3, 25], [5, 24, 0, 14]]) if use_box else None
    out = refine_cams_with_bkg(par, images, cams, y, box, high_thre=0.6, low_thre=0.3, down_scale=2)
    ref = naive_refine(par, images, cams, y, box, 0.6, 0.3, 2)
    assert out.dtype == torch.long and out.shape == (b, h, w)
    assert torch.equal(out, ref)
    values = set(out.unique().tolist())
    assert {0, 255} <= values and len(values) >= 4  # bg, ignore and several classes occur
    for i in range(b):  # only present classes are ever predicted
        allowed = {0, 255} | {j + 1 for j in range(k) if y[i, j] > 0}
        assert set(out[i].unique().tolist()) <= allowed


def test_refine_combination_rule_by_hand():
    # num_iter=0 and down_scale=1 make PAR and the resizes identities, so
    # label_h = class where its cam beats 0.7, label_l = class where it beats 0.25.
    cams = torch.tensor([[[[0.9, 0.5, 0.1, 0.8]], [[0.0, 0.6, 0.2, 0.95]]]])  # (1, 2, 1, 4)
    y = torch.tensor([[1.0, 0.0]])  # class 2 absent: its 0.95 is ignored
    images = torch.rand(1, 3, 1, 4)
    par = PAR(num_iter=0, dilations=(1,))
    out = refine_cams_with_bkg(
        par, images, cams, y, None, high_thre=0.7, low_thre=0.25, down_scale=1
    )
    assert out.tolist() == [[[1, 255, 0, 1]]]
    box = torch.tensor([[0, 1, 1, 4]])
    out = refine_cams_with_bkg(
        par, images, cams, y, box, high_thre=0.7, low_thre=0.25, down_scale=1
    )
    assert out.tolist() == [[[255, 255, 0, 1]]]


def test_refine_ties_go_to_the_lower_class_id():
    # Classes 2 and 4 present with equal CAMs: the reference's argmax over [bg, 2, 4] picks 2.
    cams = torch.zeros(2, 5, 1, 3)
    cams[:, 1] = cams[:, 3] = torch.tensor([0.9, 0.5, 0.1])
    y = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    par = PAR(num_iter=0, dilations=(1,))
    out = refine_cams_with_bkg(par, torch.rand(2, 3, 1, 3), cams, y, None, 0.7, 0.25, down_scale=1)
    assert out.tolist() == [[[2, 255, 0]], [[2, 255, 0]]]


def test_refine_and_multi_scale_cam_under_autocast():
    torch.manual_seed(3)
    images = torch.rand(2, 3, 16, 16)
    cams = torch.rand(2, 3, 16, 16)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    par = PAR(num_iter=2, dilations=(1, 2))
    ref = refine_cams_with_bkg(par, images, cams, y, None)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = refine_cams_with_bkg(par, images, cams, y, None)
        fn = ToyCam()
        fn.w, fn.w_aux = fn.w.float(), fn.w_aux.float()
        cam, aux = multi_scale_cam(lambda x: tuple(m.bfloat16() for m in fn(x)), images)
    assert torch.equal(out, ref)
    assert cam.dtype == torch.float32 and aux.dtype == torch.float32
    assert cam.min() == 0 and cam.max() < 1
