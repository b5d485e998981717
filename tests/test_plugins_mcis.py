"""MCIS plug-in: co-attention maths and symmetry, the losses, and the class-aware pair sampler."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.backbone import EncoderOutput
from models.heads import CAMClassifier
from toco.method.step import StepState
from toco.plugins.mcis import CoAttention, CrossImageSemantics, co_attention_cams, cross_image_cam
from toco.train.sampling import PairedResumableSampler, ResumableSampler


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_co_attention_shapes_and_formula():
    torch.manual_seed(0)
    head = CoAttention(6, 4)
    fm, fn = torch.randn(2, 5, 6), torch.randn(2, 3, 6)
    att_m, att_n = head.attend(fm, fn)
    assert att_m.shape == (2, 5, 6) and att_n.shape == (2, 3, 6)
    w = head.affinity.weight.detach().numpy()
    for p in range(2):
        m, n = fm[p].numpy(), fn[p].numpy()
        s = (m @ w.T) @ n.T / math.sqrt(6)  # S_ij = (W f_m,i) . f_n,j
        np.testing.assert_allclose(
            att_n[p].detach().numpy(), np_softmax(s, 0).T @ m, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            att_m[p].detach().numpy(), np_softmax(s, 1) @ n, rtol=1e-5, atol=1e-6
        )


def test_co_attention_is_symmetric_under_swapping_the_pair():
    torch.manual_seed(1)
    head = CoAttention(6, 4)
    with torch.no_grad():  # a symmetric W: swapping the images swaps the outputs
        head.affinity.weight.copy_(head.affinity.weight + head.affinity.weight.t())
    fm, fn = torch.randn(3, 4, 6), torch.randn(3, 7, 6)
    a_m, a_n = head.attend(fm, fn)
    b_n, b_m = head.attend(fn, fm)
    torch.testing.assert_close(a_m, b_m)
    torch.testing.assert_close(a_n, b_n)
    general = CoAttention(6, 4)
    transposed = CoAttention(6, 4)
    with torch.no_grad():  # in general (m, n) with W equals (n, m) with W^T
        transposed.affinity.weight.copy_(general.affinity.weight.t())
    a_m, a_n = general.attend(fm, fn)
    b_n, b_m = transposed.attend(fn, fm)
    torch.testing.assert_close(a_m, b_m)
    torch.testing.assert_close(a_n, b_n)


def test_low_rank_affinity_has_the_same_shapes():
    head = CoAttention(8, 3, lowrank_dim=2)
    att_m, att_n = head.attend(torch.randn(1, 4, 8), torch.randn(1, 6, 8))
    assert att_m.shape == (1, 4, 8) and att_n.shape == (1, 6, 8)
    assert sum(p.numel() for p in head.affinity.parameters()) == 2 * 8 * 2


def make_state(tokens: torch.Tensor, labels: torch.Tensor, iteration: int = 10, model=None):
    b = tokens.shape[0]
    return StepState(
        iteration=iteration,
        images=torch.zeros(b, 3, 8, 8),
        cls_label=labels,
        img_box=torch.zeros(b, 4),
        feats=EncoderOutput(tokens.mean((-2, -1)), tokens, tokens),
        logits=torch.zeros_like(labels),
        aux_logits=torch.zeros_like(labels),
        seg_logits=torch.zeros(b, 4, 2, 2),
        cam=None,
        cam_aux=None,
        make_pseudo_label=None,
        make_token_label=None,
        make_ctc=None,
        model=model,
    )


def mlsm(logits, labels):
    x, y = logits.detach().numpy().astype(np.float64), labels.numpy()
    ls = -(y * np.log(1 / (1 + np.exp(-x))) + (1 - y) * np.log(1 / (1 + np.exp(x))))
    return ls.mean(axis=1)


def test_losses_match_independent_values_and_skip_empty_unshared_rows():
    torch.manual_seed(2)
    tokens = torch.randn(4, 6, 2, 3)
    labels = torch.tensor(
        [
            [1.0, 1.0, 0.0],
            [1.0, 0.0, 0.0],  # pair 0: common {0}, m has {1}
            [0.0, 0.0, 1.0],
            [0.0, 0.0, 1.0],
        ]
    )  # pair 1: common {2}, nothing else
    mcis = CrossImageSemantics(6, 4, w_co=1.0, w_ex=2.0)
    out = mcis.compute(make_state(tokens, labels))
    x = tokens.flatten(2).transpose(1, 2)
    att_m, att_n = mcis.head.attend(x[0::2], x[1::2])
    w = mcis.head.classifier.weight
    co = torch.cat([att_m, att_n]).mean(1) @ w.t()
    common = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    assert float(out["mcis_co"]) == pytest.approx(
        mlsm(co, torch.cat([common, common])).mean(), rel=1e-5
    )

    def gate(f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return f * (1 - torch.sigmoid(a @ mcis.head.gate.weight.t()))

    ex = torch.cat([gate(x[0::2], att_m), gate(x[1::2], att_n)]).mean(1) @ w.t()
    y_ex = torch.tensor([[0, 1.0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])  # rows m0, m1, n0, n1
    per_row = mlsm(ex, y_ex)
    assert float(out["mcis_ex"]) == pytest.approx(2.0 * per_row[0], rel=1e-5)
    official = CrossImageSemantics(6, 4, w_ex=1.0, ex_empty_rows=True)
    official.load_state_dict(mcis.state_dict())
    assert float(official.compute(make_state(tokens, labels))["mcis_ex"]) == pytest.approx(
        per_row.mean(), rel=1e-5
    )
    late = CrossImageSemantics(6, 4, ex_start=11).compute(make_state(tokens, labels))
    assert set(late) == {"mcis_co"}


def test_losses_backpropagate_and_can_share_the_classifier():
    tokens = torch.randn(2, 6, 2, 2, requires_grad=True)
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    model = torch.nn.Module()
    model.classifier = CAMClassifier(6, 3)
    mcis = CrossImageSemantics(6, 4, share_classifier=True)
    assert mcis.head.classifier is None
    out = mcis.compute(make_state(tokens, labels, model=model))
    sum(out.values()).backward()
    assert model.classifier.conv.weight.grad.abs().sum() > 0
    assert tokens.grad.abs().sum() > 0 and mcis.head.affinity.weight.grad.abs().sum() > 0
    with pytest.raises(Exception, match="pairs"):
        mcis.compute(make_state(torch.randn(3, 6, 2, 2), torch.ones(3, 3), model=model))


class Net(torch.nn.Module):
    """encode: a stride-4 conv 'patch embedding' (D = 6); ToCo's CAM classifier (3 classes)."""

    patch_size = 4

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 6, 4, stride=4)
        self.classifier = CAMClassifier(6, 3)

    def encode(self, x):
        t = self.embed(x)
        return EncoderOutput(t.mean((-2, -1)), t, t)


def test_cross_image_cam_keeps_each_class_from_its_partners():
    torch.manual_seed(3)
    net, mcis = Net(), CrossImageSemantics(6, 4)
    cam_m, cam_n = co_attention_cams(net, mcis, torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 12))
    assert cam_m.shape == (2, 3, 4, 4) and cam_n.shape == (2, 3, 2, 3)
    cam = cross_image_cam(
        net,
        mcis,
        torch.rand(1, 3, 16, 16),
        torch.tensor([[1.0, 0.0, 1.0]]),
        {0: [torch.rand(1, 3, 16, 16)] * 2, 2: [torch.rand(1, 3, 8, 8)]},
    )
    assert cam.shape == (1, 3, 16, 16) and cam[:, 1].abs().sum() == 0
    assert 0 <= float(cam.min()) and float(cam.max()) <= 1


def _unit_map(raw, size=(16, 16)):
    m = torch.nn.functional.interpolate(
        torch.relu(raw), size=size, mode="bilinear", align_corners=False
    )
    return m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-5)


def test_cross_image_cam_adds_self_pairs_and_filters_maps_by_score():
    torch.manual_seed(4)
    net, mcis = Net(), CrossImageSemantics(6, 4)
    image, label = torch.rand(1, 3, 16, 16), torch.tensor([[0.0, 1.0, 0.0]])
    partners = {1: [torch.rand(1, 3, 16, 16), torch.rand(1, 3, 12, 12)]}
    partner_maps = [co_attention_cams(net, mcis, image, p)[0][:, 1:2] for p in partners[1]]
    flip = co_attention_cams(net, mcis, image, image.flip(-1))[1].flip(-1)[:, 1:2]
    small = co_attention_cams(
        net, mcis, image, torch.nn.functional.interpolate(image, size=(12, 12), mode="bilinear")
    )[1][:, 1:2]
    big = co_attention_cams(
        net, mcis, image, torch.nn.functional.interpolate(image, size=(32, 32), mode="bilinear")
    )[1][:, 1:2]
    maps = partner_maps + [flip, small, big]
    every = cross_image_cam(net, mcis, image, label, partners, score_thr=-1.0)
    expected = sum(_unit_map(m) for m in maps) / 5  # 2 partners + 3 self-pairs
    torch.testing.assert_close(every[:, 1:2], expected, rtol=1e-4, atol=1e-5)
    # a threshold no map passes: only the mirror pair counts, still divided by all five
    strict = cross_image_cam(net, mcis, image, label, partners, score_thr=1.0)
    torch.testing.assert_close(strict[:, 1:2], _unit_map(flip) / 5, rtol=1e-4, atol=1e-5)
    # the official filter: sigmoid(mean of the raw map) > 0.1
    kept = [m for m in maps if float(torch.sigmoid(m.mean())) > 0.1 or m is flip]
    official = cross_image_cam(net, mcis, image, label, partners)
    torch.testing.assert_close(
        official[:, 1:2], sum(_unit_map(m) for m in kept) / 5, rtol=1e-4, atol=1e-5
    )
    no_self = cross_image_cam(net, mcis, image, label, partners, self_pairs=False, score_thr=-1.0)
    torch.testing.assert_close(
        no_self[:, 1:2], sum(_unit_map(m) for m in partner_maps) / 2, rtol=1e-4, atol=1e-5
    )


def test_cross_image_cam_encodes_the_image_once():
    from toco.train.profiling import PassCounter

    net, mcis = Net(), CrossImageSemantics(6, 4)
    partners = {0: [torch.rand(1, 3, 16, 16)] * 2, 2: [torch.rand(1, 3, 12, 12)] * 3}
    counter = PassCounter(net.embed)
    cross_image_cam(net, mcis, torch.rand(1, 3, 16, 16), torch.tensor([[1.0, 0.0, 1.0]]), partners)
    assert counter.reset()[0] == 1 + 5 + 3  # the image, each partner, the three self-pairs


def test_partners_come_from_the_pool_and_share_the_class():
    import random

    from toco.plugins.mcis import sample_partners

    pool = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0], [0, 0, 1.0]])
    picks = sample_partners(torch.tensor([1.0, 1.0, 0.0]), pool, 20, random.Random(0))
    assert set(picks) == {0, 1}
    assert set(picks[0]) == {0, 2} and set(picks[1]) == {1, 2}
    only_self = sample_partners(torch.tensor([0.0, 0.0, 1.0]), pool, 3, random.Random(0), exclude=3)
    assert only_self == {2: [3, 3, 3]}  # the image itself only when no other has the class
    assert sample_partners(torch.tensor([0.0, 0.0, 1.0]), pool[:3], 2, random.Random(0)) == {2: []}


def _co_cam_by_hand(mcis, tokens, size):
    """Normalised co-attention CAMs of pairs (0, 1), (2, 3), ... computed independently."""
    b, d, h, w = tokens.shape
    x = tokens.flatten(2).transpose(1, 2)
    wa, wc = mcis.head.affinity.weight, mcis.head.classifier.weight
    out = []
    for i in range(b):
        m, n = (i, i + 1) if i % 2 == 0 else (i - 1, i)
        s = torch.einsum("md,ed,ne->mn", x[m], wa, x[n]) / math.sqrt(d)  # (W f_m) . f_n
        # the anchor attended by its partner (softmax over n), the partner by the anchor (over m)
        att = s.softmax(dim=1) @ x[n] if i == m else s.softmax(dim=0).t() @ x[m]
        cam = (att @ wc.t()).t().reshape(1, -1, h, w)
        cam = torch.nn.functional.interpolate(
            torch.relu(cam), size=size, mode="bilinear", align_corners=False
        )
        cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
        out.append(cam / (cam.amax(dim=(-2, -1), keepdim=True) + 1e-5))
    return torch.cat(out)


def test_online_fusion_is_the_max_with_the_co_attention_cam_on_shared_classes():
    torch.manual_seed(5)
    tokens = torch.randn(4, 6, 3, 3)
    labels = torch.tensor(
        [
            [1.0, 1.0, 0.0],
            [1.0, 0.0, 0.0],  # pair 0 shares class 0
            [0.0, 1.0, 1.0],
            [0.0, 1.0, 1.0],
        ]
    )  # pair 1 shares 1 and 2
    state = make_state(tokens, labels)
    state.cam = torch.rand(4, 3, 12, 12) * 0.5
    on = CrossImageSemantics(6, 4, co_cam="online_fuse")
    co = _co_cam_by_hand(on, tokens, (12, 12))
    shared = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 1.0], [0, 1.0, 1.0]])
    fused = on.pseudo_label_cam(state, state.cam)
    want = torch.where(shared[..., None, None] > 0, torch.maximum(state.cam, co), state.cam)
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-5)
    assert (fused > state.cam).any()  # the co-attention CAM is higher somewhere
    mean = CrossImageSemantics(6, 4, co_cam="online_fuse", co_cam_fuse="mean")
    mean.load_state_dict(on.state_dict())
    torch.testing.assert_close(
        mean.pseudo_label_cam(state, state.cam),
        torch.where(shared[..., None, None] > 0, (state.cam + co) / 2, state.cam),
        rtol=1e-4,
        atol=1e-5,
    )
    off = CrossImageSemantics(6, 4)
    assert off.pseudo_label_cam(state, state.cam) is state.cam
    late = CrossImageSemantics(6, 4, co_cam="online_fuse", co_cam_start=11)
    assert late.pseudo_label_cam(state, state.cam) is state.cam  # iteration 10 < 11


def test_online_fusion_changes_the_pseudo_label_only_when_switched_on():
    from tests.test_ablate import TINY, batch
    from toco.build import build_loss_modules, build_model
    from toco.config import TrainConfig
    from toco.plugins import build_plugins
    from toco.train.engine import Trainer

    def trainer(**plugin):
        cfg = TrainConfig.from_dict(
            {**TINY, "plugins": {"mcis": {"enable": True, "start_iter": 0, **plugin}}}
        )
        torch.manual_seed(0)
        model = build_model(cfg, 4)
        plugins = build_plugins(cfg, model.backbone.embed_dim, 4, model=model)
        return Trainer(cfg, model, build_loss_modules(cfg) + plugins, torch.device("cpu"))

    def state(t, cam):
        b = batch(0)
        images = b["image"].float() / 255
        feats = t.model.encode(images)
        return StepState(
            iteration=3,
            images=images,
            cls_label=torch.tensor([[1.0, 0, 0]] * 2),
            img_box=b["img_box"],
            feats=feats,
            logits=None,
            aux_logits=None,
            seg_logits=None,
            cam=cam,
            cam_aux=cam,
            make_pseudo_label=None,
            make_token_label=None,
            make_ctc=None,
            model=t.model,
        )

    # the in-batch fusion (co_cam_partners in_batch, as before the related-image maps)
    on = trainer(co_cam="online_fuse", co_cam_partners="in_batch", co_cam_fuse="max")
    off = trainer(co_cam="off")
    off.loss_modules.load_state_dict(on.loss_modules.state_dict())
    cam = torch.zeros(2, 3, 32, 32)
    cam[:, 0, :16] = 0.9  # class 0 confidently in the top half only
    with torch.no_grad():
        base = Trainer(off.cfg, off.model, build_loss_modules(off.cfg), torch.device("cpu"))
        plain = base._pseudo_label(state(base, cam))
        label_off = off._pseudo_label(state(off, cam))
        label_on = on._pseudo_label(state(on, cam))
        mcis = on.loss_modules[-1]
        co, _ = mcis.co_attention_maps(state(on, cam))
    assert torch.equal(label_off, plain)
    assert not torch.equal(label_on, plain)
    # where the fused CAM is foreground (> high_thre) but the CAM alone is not, the label changed
    newly = (co[:, 0] > on.cfg.high_thre) & (cam[:, 0] <= on.cfg.low_thre)
    assert newly.any() and (label_on[newly] != plain[newly]).any()


def random_labels(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.random((n, k)) < 0.25
    labels[np.arange(n), rng.integers(0, k, n)] = True  # every image has a class
    return labels


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_pair_sampler_always_pairs_images_sharing_a_class():
    labels = random_labels(60, 6, 0)
    labels[:3] = False
    labels[:3, 5] = True
    labels[3:, 5] = False
    labels[10, 5] = True  # class 5: images 0, 1, 2, 10
    labels[~labels.any(axis=1), 0] = True
    sampler = PairedResumableSampler(labels, 4, seed=1)
    keys = take(sampler, 4 * 60)  # four epochs of anchors (15 iterations each)
    idx = [k % 60 for k in keys]
    for a, p in zip(idx[0::2], idx[1::2]):
        assert (labels[a] & labels[p]).any()
        assert a != p
    assert len(set(keys)) == len(keys)  # each (epoch, anchor, role) has its own augmentation
    anchors_epoch0 = idx[0:60:2]
    assert len(set(anchors_epoch0)) == 30  # no anchor repeats within an epoch


def test_pair_sampler_resumes_and_shards_like_the_resumable_sampler():
    labels = random_labels(40, 5, 2)
    full = take(PairedResumableSampler(labels, 4, seed=3), 4 * 25)
    resumed = take(PairedResumableSampler(labels, 4, seed=3, start_iter=7), 4 * 18)
    assert resumed == full[4 * 7 :]
    ranks = [
        take(PairedResumableSampler(labels, 2, seed=3, rank=r, world_size=2), 2 * 20)
        for r in range(2)
    ]
    for t in range(20):  # iteration t: the two ranks hold different anchors
        a0, a1 = ranks[0][2 * t] % 40, ranks[1][2 * t] % 40
        assert a0 != a1
    again = take(PairedResumableSampler(labels, 4, seed=3), 4 * 25)
    assert again == full
    assert take(PairedResumableSampler(labels, 4, seed=4), 8) != full[:8]
    assert PairedResumableSampler(labels, 4, seed=3).iters_per_epoch == 20
    assert ResumableSampler(40, 4, 3).iters_per_epoch == 10  # anchors only: twice the iterations


def test_random_policy_and_bad_batches():
    labels = random_labels(10, 3, 4)
    keys = take(PairedResumableSampler(labels, 2, seed=0, policy="random"), 40)
    assert all(a % 10 != p % 10 for a, p in zip(keys[0::2], keys[1::2]))
    with pytest.raises(ValueError, match="even"):
        PairedResumableSampler(labels, 3, seed=0)


def test_mcis_trains_through_the_cli(tmp_path):
    import train
    from tests.fixtures import make_standard_voc_tree
    from tests.test_cli import run, train_args

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    work = tmp_path / "run"
    argv = train_args(
        root,
        work,
        "--max-iters",
        "3",
        "--mcis",
        "--plugin-start-iter",
        "0",
        "--eval-every",
        "3",
        "--log-every",
        "1",
        "--threads",
        "1",
    )
    argv[argv.index("--batch-size") + 1] = "4"
    assert run(train, argv) == 0
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "total" in r]
    assert len(losses) == 3
    assert all(math.isfinite(r["mcis_co"]) and math.isfinite(r["mcis_ex"]) for r in losses)
    # cross-image CAM inference from the checkpoint (the co-attention head is in the trainer state)
    from toco.evaluation import mcis as mcis_eval

    out = tmp_path / "mcis.json"
    assert (
        run(
            mcis_eval,
            [
                "--checkpoint",
                str(work / "checkpoints" / "last.pt"),
                "--partners",
                "2",
                "--size",
                "32",
                "--output-json",
                str(out),
            ],
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert 0 <= report["miou"] <= 100 and report["num_images"] == 3
    assert report["partner_split"] == "train" and report["self_pairs"]


def test_odd_batch_is_refused(tmp_path, capsys):
    import train
    from tests.fixtures import make_standard_voc_tree
    from tests.test_cli import run, train_args

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    argv = train_args(
        root, tmp_path / "run", "--max-iters", "1", "--mcis", "--loss-group-size", "0"
    )
    argv[argv.index("--batch-size") + 1] = "3"
    assert run(train, argv) == 2
    assert "--batch-size 3 is odd" in capsys.readouterr().err


def test_self_pairs_loss_is_the_co_attention_with_the_mirror_image():
    torch.manual_seed(6)
    net = Net()
    images = torch.rand(2, 3, 12, 12)
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    feats = net.encode(images)
    state = StepState(
        iteration=10,
        images=images,
        cls_label=labels,
        img_box=torch.zeros(2, 4),
        feats=feats,
        logits=None,
        aux_logits=None,
        seg_logits=None,
        cam=None,
        cam_aux=None,
        make_pseudo_label=None,
        make_token_label=None,
        make_ctc=None,
        model=net,
    )
    mcis = CrossImageSemantics(6, 4, self_pairs=True)
    out = mcis.compute(state)
    x = feats.tokens.flatten(2).transpose(1, 2)
    xf = net.encode(images.flip(-1)).tokens.flatten(2).transpose(1, 2)
    att_x, att_f = mcis.head.attend(x, xf)
    scores = torch.cat([att_x, att_f]).mean(1) @ mcis.head.classifier.weight.t()
    assert float(out["mcis_self"]) == pytest.approx(
        mlsm(scores, torch.cat([labels, labels])).mean(), rel=1e-5
    )
    out["mcis_self"].backward()
    assert net.embed.weight.grad.abs().sum() > 0


def test_related_maps_match_a_hand_computed_map():
    """Two partners of class 0 from the bank and two self-views (the mirror image, always
    counted, and a 2x2 rescaled view subject to the score filter), against the official rule
    written out: per map ReLU, upsample, / max; sum of the counted maps / number of maps."""
    from toco.plugins.mcis import PartnerBank, related_image_maps

    torch.manual_seed(12)
    d, h, w, size = 6, 3, 3, (6, 6)
    head = CrossImageSemantics(d, 3).head
    weight = head.classifier.weight.detach()
    x = torch.randn(1, h * w, d)
    labels = torch.tensor([[1.0, 0.0]])
    p1, p2 = torch.randn(h * w, d), torch.randn(h * w, d)
    bank = PartnerBank(2, 3, h * w, d)
    bank.push(torch.stack([p1, p2]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert bank.count.tolist() == [2, 1]
    image, cls, tokens = bank.draw(labels, 2, torch.Generator().manual_seed(0))
    assert image.tolist() == [0, 0] and cls.tolist() == [0, 0]
    mirror, small = torch.randn(1, h * w, d), torch.randn(1, 4, d)
    views = [(True, True, mirror, (h, w)), (False, False, small, (2, 2))]
    got, count = related_image_maps(
        head, weight, x, (h, w), labels, (image, cls, tokens), views, size, 0.1
    )
    assert count.tolist() == [[4.0, 0.0]]

    def norm(m):  # (h', w') raw map -> normalised (H, W)
        m = F.interpolate(
            torch.relu(m)[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0]
        return m / (m.max() + 1e-5)

    def attend(fm, fn):  # S = W fm . fn / sqrt(D); fm side: softmax over n; fn side: over m
        s = (fm @ head.affinity.weight.t() @ fn.t()) / math.sqrt(d)
        return s.softmax(dim=1) @ fn, s.softmax(dim=0).t() @ fm

    total, n = torch.zeros(size), 0
    for partner in tokens:  # the image's side, channel 0
        raw = (attend(x[0], partner.float())[0] @ weight[0]).reshape(h, w)
        total += norm(raw) if torch.sigmoid(raw.mean()) > 0.1 else 0
        n += 1
    raw = (attend(x[0], mirror[0])[1] @ weight[0]).reshape(h, w).flip(-1)  # always counted
    total += norm(raw)
    n += 1
    raw = (attend(x[0], small[0])[1] @ weight[0]).reshape(2, 2)
    total += norm(raw) if torch.sigmoid(raw.mean()) > 0.1 else 0
    n += 1
    torch.testing.assert_close(got[0, 0], total / n, rtol=1e-3, atol=1e-4)
    assert got[0, 1].abs().sum() == 0  # absent class


def test_related_class_maps_are_normalised_and_empty_ones_keep_the_cam():
    """co_cam_normalise (default): each averaged class map is min-max normalised before it is
    averaged with the CAM (the official pseudo-label step normalises its class maps); a class
    whose related maps are all zero keeps the CAM (was: CAM / 2, which erased the foreground)."""
    from toco.plugins.mcis import normalised_class_maps

    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0] = torch.tensor([[0.05, 0.15], [0.25, 0.05]])  # one map of four survived the filter
    count = torch.full((1, 2, 1, 1), 4.0)
    got, kept = normalised_class_maps(maps, count)
    want = (maps[0, 0] - 0.05) / (0.20 + 1e-5)
    torch.testing.assert_close(got[0, 0], want)
    assert kept.flatten().tolist() == [4.0, 0.0]  # class 1: no evidence, no fusion

    mcis = CrossImageSemantics(
        4, 3, co_cam="online_fuse", co_cam_fuse="mean", co_cam_partners="related", bank_tokens=4
    )
    cam = torch.tensor([[[[0.9, 0.2], [0.6, 0.0]], [[0.8, 0.8], [0.1, 0.3]]]])
    mcis.related_maps = lambda state: (maps, count)
    state = SimpleNamespace(iteration=0)
    fused = mcis.pseudo_label_cam(state, cam)
    torch.testing.assert_close(fused[0, 0], (cam[0, 0] + want) / 2)
    torch.testing.assert_close(fused[0, 1], cam[0, 1])  # empty map: the CAM unchanged
    mcis.co_cam_normalise = False  # stored configs from before the setting
    raw = mcis.pseudo_label_cam(state, cam)
    torch.testing.assert_close(raw, (cam + maps) / 2)


def test_default_fusion_changes_the_pseudo_label_through_a_partner():
    """Defaults: the pseudo labels are refined from the CAM averaged with the related-image
    map; a partner in the bank changes them (without any partner and self-view, they are
    ToCo's)."""
    from tests.test_ablate import TINY, batch
    from toco.build import build_loss_modules, build_model
    from toco.config import TrainConfig
    from toco.plugins import build_plugins
    from toco.train.engine import Trainer

    cfg = TrainConfig.from_dict({**TINY, "plugins": {"mcis": {"enable": True, "start_iter": 0}}})
    s = cfg.plugins.mcis
    assert (s.co_cam, s.co_cam_partners, s.co_cam_fuse, s.co_cam_self_views) == (
        "online_fuse",
        "related",
        "mean",
        True,
    )
    assert s.co_cam_normalise
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    plugins = build_plugins(cfg, model.backbone.embed_dim, 4, model=model)
    trainer = Trainer(cfg, model, build_loss_modules(cfg) + plugins, torch.device("cpu"))
    base = Trainer(cfg, model, build_loss_modules(cfg), torch.device("cpu"))
    mcis = plugins[0]
    assert mcis.needs_cam_views and mcis.bank.tokens.shape == (3, 3, 4, 192)
    b = batch(0)
    images = b["image"].float() / 255
    cam = torch.zeros(2, 3, 32, 32)
    cam[:, 0, :16] = 0.9

    def state(t):
        with torch.no_grad():
            feats = t.model.encode(images)
        return StepState(
            iteration=3,
            images=images,
            cls_label=torch.tensor([[1.0, 0, 0]] * 2),
            img_box=b["img_box"],
            feats=feats,
            logits=None,
            aux_logits=None,
            seg_logits=None,
            cam=cam,
            cam_aux=cam,
            make_pseudo_label=None,
            make_token_label=None,
            make_ctc=None,
            model=t.model,
        )

    with torch.no_grad():
        plain = base._pseudo_label(state(base))
        assert torch.equal(trainer._pseudo_label(state(trainer)), plain)  # empty bank
        partner = model.encode(batch(5)["image"].float() / 255).tokens
        mcis.bank.push(partner.flatten(2).transpose(1, 2), torch.tensor([[1.0, 0, 0]] * 2))
        label = trainer._pseudo_label(state(trainer))
    assert not torch.equal(label, plain)


def test_cam_views_are_the_mirrored_and_rescaled_inputs_of_the_cam_passes():
    from toco.method.cam import multi_scale_cam, split_cam_passes

    images = torch.rand(2, 3, 8, 8)
    seen = []

    def cam_fn(x):
        seen.append(x)
        return torch.zeros(x.shape[0], 2, 2, 2), torch.zeros(x.shape[0], 2, 2, 2)

    given = (torch.zeros(2, 2, 2, 2), torch.zeros(2, 2, 2, 2))
    multi_scale_cam(cam_fn, images, (1.0, 0.5, 1.5), given=given)
    views = split_cam_passes(seen, 2, (1.0, 0.5, 1.5))

    def resize(s):
        return F.interpolate(images, size=(int(8 * s),) * 2, mode="bilinear", align_corners=False)

    want = [
        (1.0, True, images.flip(-1)),
        (0.5, False, resize(0.5)),
        (0.5, True, resize(0.5).flip(-1)),
        (1.5, False, resize(1.5)),
        (1.5, True, resize(1.5).flip(-1)),
    ]
    assert [(s, m) for s, m, _ in views] == [(s, m) for s, m, _ in want]
    for (_, _, got), (_, _, exp) in zip(views, want):
        assert torch.equal(got, exp)
