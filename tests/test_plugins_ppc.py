"""PPC plug-in: prototypes, semi-hard ranks, hard pixels and losses against independent maths."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.backbone import EncoderOutput
from models.heads import CAMClassifier
from toco.method.step import StepState
from toco.plugins.common import minmax_normalise
from toco.plugins.ppc import (
    IGNORE,
    PixelPrototypeContrast,
    class_balanced_mean,
    class_scores,
    hard_pixel_weights,
    ppc_pseudo_label,
    prototype_ce,
    prototypes,
    semi_hard_ce,
    semi_hard_negatives,
)


def test_prototypes_are_weighted_means_of_the_top_k_pixels():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(7, 3), dim=1)
    scores = torch.rand(7, 3)
    pixel_ok = torch.tensor([True, True, False, True, True, True, True])
    class_ok = torch.tensor([True, True, False])
    scores[2, 0] = 5.0  # the best score of class 0, on a pixel that may not be evidence
    protos, ok = prototypes(emb, scores, pixel_ok, k=3, class_ok=class_ok)
    for c in range(3):
        cand = [i for i in range(7) if pixel_ok[i]]
        top = sorted(cand, key=lambda i: -float(scores[i, c]))[:3]
        expected = sum(float(scores[i, c]) * emb[i].numpy() for i in top)
        expected = expected / np.linalg.norm(expected)
        np.testing.assert_allclose(protos[c].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert ok.tolist() == [True, True, False]


def test_prototype_without_positive_weight_does_not_exist():
    emb = F.normalize(torch.randn(4, 2), dim=1)
    scores = torch.zeros(4, 2)
    scores[:, 0] = 1.0
    everything = torch.ones(4, dtype=torch.bool)
    _, ok = prototypes(emb, scores, everything, 2, torch.ones(2, dtype=torch.bool))
    assert ok.tolist() == [True, False]


def test_semi_hard_window_ranks_and_excludes_the_positive():
    c = 21
    rng = np.random.default_rng(1)
    sim = torch.from_numpy(rng.permutation(c).astype(np.float32)[None].repeat(3, 0))
    sim[1] = torch.from_numpy(rng.permutation(c).astype(np.float32))
    label = torch.tensor([int(sim[0].argmax()), int(sim[1].argsort(descending=True)[5]), 0])
    proto_ok = torch.ones(c, dtype=torch.bool)
    proto_ok[int(sim[2].argsort(descending=True)[0])] = False  # the most similar does not exist
    keep = semi_hard_negatives(sim, label, proto_ok, 3, 13)
    for i in range(3):
        existing = [j for j in range(c) if proto_ok[j]]
        ranked = sorted(existing, key=lambda j: -float(sim[i, j]))
        expected = {j for j in ranked[3:13] if j != int(label[i])}
        assert set(torch.nonzero(keep[i]).flatten().tolist()) == expected
    assert keep[1].sum() == 9  # the positive sat at rank 5 inside the window: counted once
    assert keep[0].sum() == 10


def test_semi_hard_loss_matches_the_formula():
    torch.manual_seed(2)
    sim = torch.rand(4, 8) * 2 - 1
    label = torch.tensor([0, 3, IGNORE, 7])
    ok = torch.ones(8, dtype=torch.bool)
    loss, valid = semi_hard_ce(sim, label, ok, tau=0.1, first=2, last=5)
    assert valid.tolist() == [True, True, False, True]
    for i in (0, 1, 3):
        y = int(label[i])
        ranked = sorted(range(8), key=lambda j: -float(sim[i, j]))
        negs = [j for j in ranked[2:5] if j != y]
        terms = [math.exp(float(sim[i, j]) / 0.1) for j in [y] + negs]
        assert float(loss[i]) == pytest.approx(-math.log(terms[0] / sum(terms)), rel=1e-5)
    assert float(loss[2]) == 0.0


def test_prototype_ce_is_a_softmax_over_existing_prototypes():
    sim = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.5, 0.8]])
    ok = torch.tensor([True, False, True])
    loss, valid = prototype_ce(sim, torch.tensor([0, 1]), ok, tau=0.5)
    expected = -math.log(math.exp(1.8) / (math.exp(1.8) + math.exp(-0.4)))
    assert float(loss[0]) == pytest.approx(expected, rel=1e-6)
    assert valid.tolist() == [True, False] and float(loss[1]) == 0.0


def test_hard_pixel_window_of_ascending_similarity():
    # class 1: 10 pixels, class 2: 2 pixels, class 3: 1 pixel (skipped), one ignored pixel
    sims = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0, 0.5, 0.2, 0.3, 0.1])
    label = torch.tensor([1] * 10 + [2, 2, 3, IGNORE])
    valid = label != IGNORE
    w, group = hard_pixel_weights(
        sims, label, valid, num_classes=4, random_frac=0.0, lo=0.1, hi=0.6
    )
    for cls, n in ((1, 10), (2, 2)):
        idx = [i for i in range(14) if int(label[i]) == cls]
        asc = sorted(idx, key=lambda i: float(sims[i]))
        hi = math.floor(0.6 * n)
        expected = set(asc[hi - n // 2 : hi])  # PPC: [floor(0.6 n) - floor(n / 2), floor(0.6 n))
        assert {i for i in idx if w[i] > 0} == expected
    assert float(w[12]) == 0 and float(w[13]) == 0  # n_c < 2 and ignored
    assert int(group[13]) == 4


def test_hard_pixel_random_half_without_replacement():
    label = torch.tensor([1] * 9 + [2] * 6)
    sims = torch.linspace(0, 1, 15)
    gen = torch.Generator().manual_seed(3)
    w, _ = hard_pixel_weights(
        sims, label, torch.ones(15, dtype=torch.bool), 3, 0.5, 0.0, 0.0, generator=gen
    )
    assert w.max() == 1  # the hard window is empty: only random draws, each pixel once
    assert int(w[:9].sum()) == 4 and int(w[9:].sum()) == 3


def test_class_balanced_mean_ignores_unsampled_classes():
    loss = torch.tensor([1.0, 3.0, 10.0, 5.0])
    weights = torch.tensor([1.0, 1.0, 0.0, 2.0])
    group = torch.tensor([0, 0, 1, 2])
    assert float(class_balanced_mean(loss, weights, group, 3)) == pytest.approx((2.0 + 5.0) / 2)


def test_pseudo_label_rule_and_ignore_band():
    cam = torch.tensor([[[[0.9, 0.3]], [[0.2, 0.6]]]])  # (1, 2 classes, 1, 2)
    y = torch.tensor([[1.0, 1.0]])
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    assert ppc_pseudo_label(cam, y, 0.5, valid).tolist() == [[[1, 2]]]
    assert ppc_pseudo_label(cam, torch.tensor([[1.0, 0.0]]), 0.5, valid).tolist() == [[[1, 0]]]
    assert ppc_pseudo_label(cam, y, 0.5, valid, band=(0.25, 0.7)).tolist() == [[[1, IGNORE]]]
    scores = class_scores(cam, torch.tensor([[1.0, 0.0]]))
    np.testing.assert_allclose(scores[0, :, 0].numpy(), [[0.1, 0.7], [0.9, 0.3], [0, 0]], atol=1e-6)


class FakeNet(torch.nn.Module):
    """encode: 1x1-conv 'patch embedding' at stride `patch`; CAM classifiers as ToCo's."""

    patch_size = 4

    def __init__(self, dim: int = 8, k: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, dim, self.patch_size, stride=self.patch_size)
        self.classifier = CAMClassifier(dim, k)
        self.aux_classifier = CAMClassifier(dim, k)

    def encode(self, x):
        t = self.embed(x)
        return EncoderOutput(t.mean(dim=(-2, -1)), t, t * 0.5)


def make_state(net: FakeNet, scale_cam_from_online: bool, b: int = 2, size: int = 32):
    torch.manual_seed(4)
    images = torch.rand(b, 3, size, size)
    feats = net.encode(images)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[:b]
    if scale_cam_from_online:
        with torch.no_grad():
            cam = minmax_normalise(F.relu(net.classifier.cam(feats.tokens)))
        cam = F.interpolate(cam, scale_factor=net.patch_size, mode="nearest")
    else:
        cam = torch.rand(b, 3, size, size)
    box = torch.tensor([[0, size, 0, size]] * b)
    return StepState(
        iteration=5,
        images=images,
        cls_label=y,
        img_box=box,
        feats=feats,
        logits=torch.zeros(b, 3),
        aux_logits=torch.zeros(b, 3),
        seg_logits=torch.zeros(b, 4, 8, 8),
        cam=cam,
        cam_aux=cam,
        make_pseudo_label=None,
        make_token_label=None,
        make_ctc=None,
        model=net,
    )


def test_identical_views_make_cross_prototype_equal_cross_cam():
    net = FakeNet()
    ppc = PixelPrototypeContrast(8, 4, view_scale=1.0, bkg_thre=0.3, topk_ratio=0.25)
    out = ppc.compute(make_state(net, scale_cam_from_online=True))
    assert float(out["ppc_cp"]) == pytest.approx(float(out["ppc_cc"]), rel=1e-6)
    assert float(out["ppc_cp"]) > 0


def test_ppc_losses_are_finite_and_train_the_encoder_and_head():
    net = FakeNet()
    ppc = PixelPrototypeContrast(
        8,
        4,
        view_scale=0.5,
        view_flip=True,
        bkg_thre=0.3,
        semi_hard=(1, 3),
        terms=(1.0, 0.5, 2.0),
        proto_scope="gather",
    )
    state = make_state(net, scale_cam_from_online=False)
    out = ppc.compute(state)
    assert set(out) == {"ppc_cp", "ppc_cc", "ppc_intra", "ppc_hardest_dropped"}
    total = sum(v for k, v in out.items() if k not in ppc.stat_names)
    assert torch.isfinite(total)
    total.backward()
    assert net.embed.weight.grad.abs().sum() > 0
    assert ppc.proj.fc1.weight.grad.abs().sum() > 0
    assert ("rescaled_view", 0.5, True) in state.extras  # one extra pass, cached
    # the same step and seed draw the same random pixels
    again = PixelPrototypeContrast(
        8,
        4,
        view_scale=0.5,
        view_flip=True,
        bkg_thre=0.3,
        semi_hard=(1, 3),
        terms=(1.0, 0.5, 2.0),
        proto_scope="gather",
    )
    again.load_state_dict(ppc.state_dict())
    out2 = again.compute(make_state(net, scale_cam_from_online=False))
    for k in out:
        assert float(out2[k]) == pytest.approx(float(out[k]), rel=1e-6)


def test_gather_scope_is_the_batch_scope_on_one_process():
    net = FakeNet()
    a = PixelPrototypeContrast(8, 4, proto_scope="batch", bkg_thre=0.3)
    b = PixelPrototypeContrast(8, 4, proto_scope="gather", bkg_thre=0.3)
    b.load_state_dict(a.state_dict())
    oa = a.compute(make_state(net, False))
    ob = b.compute(make_state(net, False))
    for k in oa:
        assert float(oa[k]) == float(ob[k])


def test_zero_term_weight_skips_the_term():
    net = FakeNet()
    out = PixelPrototypeContrast(8, 4, terms=(0.0, 1.0, 0.0)).compute(make_state(net, False))
    assert set(out) == {"ppc_cc"}


def test_ppc_trains_through_the_cli(tmp_path, capsys):
    import train
    from tests.fixtures import make_standard_voc_tree
    from tests.test_cli import run, train_args

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    work = tmp_path / "run"
    assert (
        run(
            train,
            train_args(
                root,
                work,
                "--max-iters",
                "4",
                "--stop-at",
                "3",
                "--ppc",
                "--plugin-start-iter",
                "0",
                "--ppc-view2-flip",
                "--ppc-ignore-band",
                "--eval-every",
                "4",
                "--log-every",
                "1",
                "--threads",
                "1",
            ),
        )
        == 0
    )
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "total" in r]
    assert len(losses) == 3
    assert all(math.isfinite(r[k]) for r in losses for k in ("ppc_cp", "ppc_cc", "ppc_intra"))
    capsys.readouterr()
    # continuing the unfinished run with another plug-in set is refused with one clear line ...
    assert run(train, train_args(root, work, "--max-iters", "4", "--threads", "1")) == 2
    assert "plugins.ppc.enable: True -> False" in capsys.readouterr().err
    # ... and --resume continues it with its own plug-ins (only resumable settings change)
    assert run(train, train_args(root, work, "--max-iters", "4", "--resume", "--threads", "1")) == 0
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert "ppc_cp" in [r for r in records if "total" in r][-1]


def test_no_prototype_at_all_gives_zero_loss_and_finite_gradients():
    sim = torch.rand(3, 4, requires_grad=True)
    loss, valid = prototype_ce(
        sim, torch.tensor([0, 1, IGNORE]), torch.zeros(4, dtype=torch.bool), tau=0.1
    )
    assert not valid.any()
    loss.sum().backward()
    assert torch.isfinite(sim.grad).all()


def test_scaled_window_is_the_official_one_at_21_prototypes():
    from toco.plugins.ppc import scaled_window

    def window(n):
        lo, hi = scaled_window(3, 13, torch.tensor(n))
        return int(lo), int(hi)

    assert window(21) == (3, 13)  # the official ranks
    assert window(3) == (0, 2)  # ceil(13 * 3 / 21) = 2: the nearest other prototype stays
    assert window(81) == (11, 51)  # COCO: skip the top ~14%, keep to the ~63rd percentile
    assert window(1) == (0, 1)  # never empty

    # the default floor 2: the hardest negative (rank 0 or 1) is never in the window
    def floor2(n):
        return tuple(int(v) for v in scaled_window(3, 13, torch.tensor(n), min_first=2))

    assert floor2(21) == (3, 13) and floor2(81) == (11, 51)
    assert floor2(7) == (2, 5)  # the synthetic set: 6 classes and background
    assert floor2(3) == (2, 3)


def test_intra_loss_is_non_zero_on_a_two_image_two_class_batch():
    net = FakeNet()
    state = make_state(net, scale_cam_from_online=False)
    state.cls_label = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # 3 prototypes with bg
    relative = PixelPrototypeContrast(
        8, 4, bkg_thre=0.3, terms=(0.0, 0.0, 1.0), proto_scope="gather", semi_hard_min_first=0
    )
    official = PixelPrototypeContrast(
        8, 4, bkg_thre=0.3, terms=(0.0, 0.0, 1.0), proto_scope="gather", semi_hard_window="absolute"
    )
    official.load_state_dict(relative.state_dict())
    intra = relative.compute(state)["ppc_intra"]
    assert float(intra) > 0.05
    intra.backward()
    assert relative.proj.fc2.weight.grad.abs().sum() > 0
    # the official absolute ranks [3, 13) hold no negative among 3 prototypes: exactly 0
    state = make_state(net, scale_cam_from_online=False)
    state.cls_label = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(official.compute(state)["ppc_intra"]) == 0.0


def test_ema_prototypes_blend_and_stand_in_for_absent_classes():
    ppc = PixelPrototypeContrast(2, 4, proj_dim=2, proto_scope="ema", ema_momentum=0.9)
    assert set(ppc.state_dict()) >= {"proto_ema", "proto_seen"}
    assert (
        "proto_ema"
        not in PixelPrototypeContrast(2, 4, proj_dim=2, proto_scope="gather").state_dict()
    )
    p1 = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]), dim=1)
    p2 = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 1.0], [2.0, 2.0]]), dim=1)
    ppc._update_ema(p1, torch.tensor([True, False, True, False]))
    assert ppc.proto_seen.tolist() == [True, False, True, False]
    assert torch.allclose(ppc.proto_ema[[0, 2]], p1[[0, 2]]) and ppc.proto_ema[1].abs().sum() == 0
    ppc._update_ema(p2, torch.tensor([True, True, False, False]))
    blended = 0.9 * p1[0] + 0.1 * p2[0]
    assert torch.allclose(ppc.proto_ema[0], blended / blended.norm())  # seen: EMA, renormalised
    assert torch.allclose(ppc.proto_ema[1], p2[1])  # first sight: the batch prototype
    assert torch.allclose(ppc.proto_ema[2], p1[2])  # absent: unchanged
    p3 = torch.full((4, 2), 0.5)
    protos, ok = ppc._with_ema(p3, torch.tensor([False, True, False, False]))
    assert ok.tolist() == [True, True, True, False]
    assert torch.allclose(protos[1], p3[1])  # the batch's own prototype wins
    assert torch.allclose(protos[[0, 2]], ppc.proto_ema[[0, 2]])


def test_ema_scope_trains_and_fills_its_buffers():
    net = FakeNet()
    ppc = PixelPrototypeContrast(8, 4, bkg_thre=0.3, proto_scope="ema")
    out = ppc.compute(make_state(net, scale_cam_from_online=False))
    assert all(torch.isfinite(v) for v in out.values())
    assert ppc.proto_seen.tolist() == [True, True, True, True]  # bg and the 3 classes of y
    assert torch.allclose(ppc.proto_ema.norm(dim=1), torch.ones(4))


def test_hardest_negative_statistic_against_a_loop():
    from toco.plugins.ppc import hardest_negative_excluded

    torch.manual_seed(3)
    c = 7
    sim = torch.rand(40, c)
    label = torch.randint(0, c, (40,))
    proto_ok = torch.tensor([True, True, False, True, True, True, True])
    for first, last in ((0, 4), (1, 4), (2, 5)):
        keep = semi_hard_negatives(sim, label, proto_ok, first, last)
        got = hardest_negative_excluded(sim, label, proto_ok, keep)
        for i in range(40):
            others = [j for j in range(c) if proto_ok[j] and j != int(label[i])]
            hardest = max(others, key=lambda j: float(sim[i, j]))
            ranked = sorted([j for j in range(c) if proto_ok[j]], key=lambda j: -float(sim[i, j]))
            assert bool(got[i]) == (hardest not in ranked[first:last])
        if first >= 2:  # the hardest negative is at rank 0 or 1: always dropped
            assert got.all()


def _reference_prototypes(emb, cam, lab, y, k):
    """Loop version of the prototypes of one view (batch scope, present classes only)."""
    b, h, w, _ = emb.shape
    c = cam.shape[1] + 1
    pixels = [
        (i, r, q)
        for i in range(b)
        for r in range(h)
        for q in range(w)
        if int(lab[i, r, q]) != IGNORE
    ]
    protos, exists = {}, {}
    for cls in range(c):

        def score(p):
            i, r, q = p
            present = [float(cam[i, j, r, q]) * float(y[i, j]) for j in range(c - 1)]
            return 1 - max(present) if cls == 0 else present[cls - 1]  # noqa: B023

        top = sorted(pixels, key=lambda p: -score(p))[:k]
        vec = sum(max(score(p), 0.0) * emb[p].double() for p in top)
        present_cls = cls == 0 or bool(y[:, cls - 1].any())
        exists[cls] = present_cls and sum(max(score(p), 0.0) for p in top) > 0
        protos[cls] = vec / vec.norm()
    return protos, exists


def _reference_f(emb, lab, protos, exists, tau):
    """mean_i F(v_i; y_i; P) over the pixels with a label whose prototype exists."""
    b, h, w, _ = emb.shape
    losses = []
    for i in range(b):
        for r in range(h):
            for q in range(w):
                yl = int(lab[i, r, q])
                if yl == IGNORE or not exists[yl]:
                    continue
                v = emb[i, r, q].double()
                logits = {c: float(v @ protos[c]) / tau for c in protos if exists[c]}
                den = math.log(sum(math.exp(x) for x in logits.values()))
                losses.append(den - logits[yl])
    return sum(losses) / len(losses)


def test_cross_view_terms_take_labels_and_prototypes_from_the_right_view():
    """L_cp and L_cc with two *different* views, against loops written from the formulas:
    L_cp = (F(v^S; y^S; P^T) + F(v^T; y^T; P^S)) / 2, L_cc = (F(v^S; y^T; P^S) +
    F(v^T; y^S; P^T)) / 2."""
    torch.manual_seed(11)
    b, h, w, d, k_fg = 2, 3, 4, 5, 3
    emb_s = F.normalize(torch.randn(b, h, w, d), dim=-1)
    emb_t = F.normalize(torch.randn(b, h, w, d), dim=-1)
    cam_s, cam_t = torch.rand(b, k_fg, h, w), torch.rand(b, k_fg, h, w)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    valid = torch.ones(b, h, w, dtype=torch.bool)
    lab_s = ppc_pseudo_label(cam_s, y, 0.4, valid)
    lab_t = ppc_pseudo_label(cam_t, y, 0.4, valid)
    lab_t[0, 0, 0] = IGNORE
    assert (lab_s != lab_t).any()  # the views disagree somewhere
    ppc = PixelPrototypeContrast(
        d, k_fg + 1, proto_scope="batch", topk_ratio=0.5, terms=(1.0, 1.0, 0.0), tau=0.1
    )
    state = StepState(
        iteration=0,
        images=torch.zeros(b, 3, 8, 8),
        cls_label=y,
        img_box=torch.zeros(b, 4),
        feats=None,
        logits=None,
        aux_logits=None,
        seg_logits=None,
        cam=None,
        cam_aux=None,
        make_pseudo_label=None,
        make_token_label=None,
        make_ctc=None,
    )
    out = ppc._losses(state, emb_s, emb_t, cam_s, cam_t, lab_s, lab_t, (h, w))
    k = round(0.5 * h * w)
    p_s, e_s = _reference_prototypes(emb_s, cam_s, lab_s, y, k)
    p_t, e_t = _reference_prototypes(emb_t, cam_t, lab_t, y, k)
    cp = 0.5 * (
        _reference_f(emb_s, lab_s, p_t, e_t, 0.1) + _reference_f(emb_t, lab_t, p_s, e_s, 0.1)
    )
    cc = 0.5 * (
        _reference_f(emb_s, lab_t, p_s, e_s, 0.1) + _reference_f(emb_t, lab_s, p_t, e_t, 0.1)
    )
    assert float(out["ppc_cp"]) == pytest.approx(cp, rel=1e-5)
    assert float(out["ppc_cc"]) == pytest.approx(cc, rel=1e-5)
    assert abs(cp - cc) > 1e-3  # the test tells the two assemblies apart


def test_default_settings_mine_semi_hard_prototypes():
    """Defaults (ema prototypes, window floor 2): once every class has a running prototype,
    the window drops the hardest negative of every anchor pixel (statistic 1)."""
    from toco.config import TrainConfig
    from toco.plugins.ppc import build_ppc
    from toco.plugins.registry import BuildContext

    cfg = TrainConfig()
    s = cfg.plugins.ppc
    assert (s.proto_scope, s.semi_hard_window, s.semi_hard_min_first, s.bkg_thre) == (
        "ema",
        "relative",
        2,
        0.2,
    )
    (ppc,) = build_ppc(
        s, BuildContext(cfg, 8, 4, __import__("toco.distributed").distributed.DistInfo())
    )
    net = FakeNet()
    ppc.proto_seen.fill_(True)
    ppc.proto_ema.copy_(F.normalize(torch.randn(4, 128), dim=1))
    out = ppc.compute(make_state(net, scale_cam_from_online=False))
    assert float(out["ppc_hardest_dropped"]) == 1.0
    assert float(out["ppc_intra"]) > 0
