"""Evaluation building blocks on hand-made inputs: the protocols' fusion rules (spec 6.1 / 6.2),
patch fitting, the pseudo-label CRF path, pseudo-label scoring, per-image scores, submissions."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datasets.files import save_palette_png
from toco.config import TrainConfig
from toco.errors import ConfigError
from toco.evaluation.protocol import build_protocol, named_protocol
from toco.evaluation.pseudo import PseudoLabelScores, refine_with_crf
from toco.evaluation.report import image_score, pick_extremes
from toco.evaluation.submission import VOC_RESULTS_DIR, pack_submission, verify_submission
from toco.method.cam import refine_cams_with_bkg
from toco.method.par import PAR

# Per scale (keyed by the width the model sees): logits of the image and of its mirror image.
# Chosen so that the VOC rule (flip SUM, scales MAX) and the COCO rule (flip MAX, scales SUM)
# pick different classes.
A1, B1 = [1.0, 0.0, 0.0], [0.0, 0.0, 3.2]
A2, B2 = [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]
A3, B3 = [0.0, 2.5, 0.0], [0.0, 2.5, 0.0]
# VOC, original 40 x 60: scales 1.0, 1.5, 1.25 -> widths 60, 90, 75, padded to 64, 96, 80.
# COCO, 448 square first: scales 1.0, 1.25, 1.5 -> 448, 560, 672.
TABLE = {64: (A1, B1), 96: (A2, B2), 80: (A3, B3), 448: (A1, B1), 560: (A2, B2), 672: (A3, B3)}
VOC_EXPECTED = [4.0, 5.0, 3.2]  # max over scales of (a + b): max([1,0,3.2],[4,0,0],[0,5,0])
COCO_EXPECTED = [3.0, 2.5, 3.2]  # sum over scales of max(a, b): [1,0,3.2]+[2,0,0]+[0,2.5,0]


class ConstantLogits(nn.Module):
    """A 'segmenter' whose logits are constant maps looked up by input width and mirroring.

    The test image is dark on its left half and bright on its right, so a mirrored input is
    recognised by its bright top-left pixel (zero padding goes to the right and bottom).
    """

    patch_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        rows = []
        for img in x:
            a, b = TABLE[x.shape[-1]]
            values = torch.tensor(b if img[0, 0, 0] > 0.5 else a)
            rows.append(values[:, None, None].expand(3, h, w))
        return torch.stack(rows)


def half_dark_image(h: int = 40, w: int = 60) -> torch.Tensor:
    image = torch.full((1, 3, h, w), 0.2)
    image[..., w // 2 :] = 0.8
    return image


@pytest.mark.parametrize(
    "name, expected, seen",
    [
        ("voc-ms", VOC_EXPECTED, [(2, 3, 48, 64), (2, 3, 64, 96), (2, 3, 64, 80)]),
        ("coco-ms", COCO_EXPECTED, [(2, 3, 448, 448), (2, 3, 560, 560), (2, 3, 672, 672)]),
    ],
)
def test_multiscale_protocols_fuse_as_the_official_tools(name, expected, seen):
    model = ConstantLogits()
    protocol = named_protocol(name, TrainConfig())
    logits = protocol.seg_logits(model, half_dark_image())
    assert model.seen == seen  # scales, order, 448 resize (COCO only), padding to 16
    assert logits.shape == (1, 3, 40, 60)  # at the label's size
    want = torch.tensor(expected)[None, :, None, None].expand(1, 3, 40, 60)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)
    assert logits.argmax(1).unique().item() == (1 if name == "voc-ms" else 2)


def test_train_val_protocol_is_one_unflipped_pass_at_the_run_square():
    model = ConstantLogits()
    protocol = named_protocol("train-val", TrainConfig(crop_size=448))
    logits = protocol.seg_logits(model, half_dark_image())
    assert model.seen == [(1, 3, 448, 448)]
    torch.testing.assert_close(logits, torch.tensor(A1)[None, :, None, None].expand(1, 3, 40, 60))
    assert named_protocol("train-val", TrainConfig(val_size=320)).size == 320


def test_overrides_mark_the_protocol_custom():
    cfg = TrainConfig()
    assert build_protocol("voc-ms", cfg).name == "voc-ms"
    assert build_protocol("voc-ms", cfg, scales=[1.0, 1.5, 1.25]).name == "voc-ms"  # same
    floor = build_protocol("voc-ms", cfg, patch_fit="floor")  # the official tool's own way
    assert floor.name == "voc-ms" and floor.patch_fit == "floor"
    custom = build_protocol("voc-ms", cfg, flip=False, size=0)
    assert custom.name == "voc-ms+custom" and not custom.flip and custom.size is None
    assert build_protocol("coco-ms", cfg, size=0).size is None
    crf = build_protocol("train-val", cfg, crf="torch").to_dict()
    assert crf["crf"] == "torch" and crf["crf_params"]["bilateral_sxy"] == 121.0
    assert build_protocol("train-val", cfg).to_dict()["crf_params"] is None
    with pytest.raises(ConfigError, match="positive"):
        build_protocol("voc-ms", cfg, scales=[1.0, -2.0])


def test_floor_patch_fit_drops_the_remainder_and_stretches_once():
    grid = torch.arange(6.0).view(1, 1, 2, 3)
    seen = []

    class Grid(nn.Module):
        patch_size = 16

        def forward(self, x):
            seen.append(x.clone())
            return grid

    image = torch.rand(1, 3, 40, 60)
    floor = build_protocol("train-val", TrainConfig(), size=0, patch_fit="floor")
    out = floor.seg_logits(Grid(), image)
    assert seen[0].shape[-2:] == (32, 48) and torch.equal(seen[0], image[..., :32, :48])
    torch.testing.assert_close(
        out, F.interpolate(grid, size=(40, 60), mode="bilinear", align_corners=False)
    )
    pad = build_protocol("train-val", TrainConfig(), size=0).seg_logits(Grid(), image)
    assert seen[1].shape[-2:] == (48, 64) and torch.equal(seen[1][..., :40, :60], image)
    assert seen[1][..., 40:, :].abs().sum() == 0 and seen[1][..., 60:].abs().sum() == 0
    up = F.interpolate(grid, size=(48, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pad, up[..., :40, :60])


def test_crf_refinement_with_identity_crf_equals_the_training_refinement():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 24, 32, generator=g)
    cams = torch.rand(3, 5, 24, 32, generator=g)
    cls_label = torch.tensor(
        [[1, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float32
    )  # the last image has no class: background
    valid = cams * cls_label[:, :, None, None]
    par = PAR(3, (1, 2))
    want = refine_cams_with_bkg(par, images, valid, cls_label, None, 0.55, 0.3, 2)
    got = refine_with_crf(par, images, valid, cls_label, 0.55, 0.3, 2, lambda img, p: p)
    assert torch.equal(got, want)
    assert (want == 255).any() and (want == 0).any() and (want == 3).any()  # all kinds occur
    assert (want[2] == 0).all()

    def keep_background(img, probs):  # a "CRF" that forces background: no foreground left
        out = torch.zeros_like(probs)
        out[:, 0] = 1
        return out

    forced = refine_with_crf(par, images, valid, cls_label, 0.55, 0.3, 2, keep_background)
    assert forced.unique().tolist() == [0]


def test_pseudo_label_scores_by_hand():
    mask = torch.tensor([[0, 1], [1, 255]])
    label = torch.tensor([[0, 255], [1, 1]])
    scores = PseudoLabelScores(2, torch.device("cpu"))
    scores.update(label[None], mask[None])
    # ignored: (0,1) is uncertain and (1,1) has no ground truth: bg 1/1, class 1 1/1
    assert scores.ignored.miou() == pytest.approx(100.0)
    # strict: the uncertain pixel misses class 1: IoU 1/2, bg 1 -> 75
    assert scores.strict.miou() == pytest.approx(75.0)
    assert scores.coverage == pytest.approx(2 / 3)


def test_image_score_and_extremes():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 0, 1, 2], [0, 1, 1, 1]])
    # bg: tp 3, union 4 -> 0.75; class 1: tp 2, gt 3 + pred 3 - 2 = 4 -> 0.5;
    # class 2: predicted once, never in gt -> 0; mean = 1.25 / 3
    assert image_score(pred, gt, 3) == pytest.approx(125 / 3)
    assert np.isnan(image_score(pred, np.full_like(gt, 255), 3))
    scores = [(0, "a", 50.0), (1, "b", 10.0), (2, "c", float("nan")), (3, "d", 90.0)]
    worst, best = pick_extremes(scores, 2)
    assert [s[1] for s in worst] == ["b", "a"] and [s[1] for s in best] == ["d"]


def test_submission_check_finds_wrong_archives(tmp_path: Path):
    root = tmp_path / "sub"
    for name, hw, value in (("a", (4, 6), 3), ("b", (5, 5), 30)):
        path = root / VOC_RESULTS_DIR / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_palette_png(np.full(hw, value, dtype=np.uint8), path)
    archive = pack_submission(root, tmp_path / "r.tar.gz", ["a", "b"])
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [f"{VOC_RESULTS_DIR}/a.png", f"{VOC_RESULTS_DIR}/b.png"]
    assert verify_submission(archive, {"a": (6, 4), "b": (5, 5)}) == [
        f"{VOC_RESULTS_DIR}/b.png: values [30] outside 0..20"
    ]
    problems = verify_submission(archive, {"a": (4, 6), "b": (5, 5), "c": (1, 1)})
    assert any("size (6, 4)" in p for p in problems) and any(
        "without a prediction" in p for p in problems
    )
