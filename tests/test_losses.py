"""ToCo losses (spec 3.1-3.4) against hand values and naive Python-loop formulas."""

import math

import pytest
import torch

from toco.method.losses import ctc_loss, multilabel_loss, ptc_loss, seg_loss


def test_multilabel_loss_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    y = (torch.rand(3, 5) > 0.5).double()
    ref = 0.0
    for i in range(3):
        for k in range(5):
            sig = 1 / (1 + math.exp(-x[i, k].item()))
            ref -= y[i, k].item() * math.log(sig) + (1 - y[i, k].item()) * math.log(1 - sig)
    assert multilabel_loss(x, y).item() == pytest.approx(ref / 15, rel=1e-12)
    assert multilabel_loss(torch.zeros(2, 4), torch.ones(2, 4)).item() == pytest.approx(math.log(2))


def naive_ptc(tokens, labels, ignore=255):
    b, d, h, w = tokens.shape
    x = tokens.reshape(b, d, h * w)
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for i in range(b):
        vecs = [x[i, :, p] / max(float(x[i, :, p].norm()), 1e-8) for p in range(h * w)]
        lab = labels[i].reshape(-1).tolist()
        for p in range(h * w):
            for q in range(h * w):
                if p == q or lab[p] == ignore or lab[q] == ignore:
                    continue
                c = abs(float(vecs[p] @ vecs[q]))
                if lab[p] == lab[q]:
                    pos_sum, n_pos = pos_sum + c, n_pos + 1
                else:
                    neg_sum, n_neg = neg_sum + c, n_neg + 1
    return 0.5 * (1 - pos_sum / (n_pos + 1)) + 0.5 * neg_sum / (n_neg + 1)


def test_ptc_loss_matches_naive_loops():
    torch.manual_seed(1)
    tokens = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    tokens[1, :, 0, 0] = 0  # a zero token: normalised with eps, cos 0
    labels = torch.tensor(
        [[[0, 1, 255], [1, 1, 0], [2, 0, 255]], [[3, 3, 3], [0, 255, 255], [0, 3, 1]]]
    )
    assert ptc_loss(tokens, labels).item() == pytest.approx(naive_ptc(tokens, labels), rel=1e-12)


def test_ptc_loss_hand_values():
    # Two identical same-label tokens: 2 ordered positive pairs with cos 1 -> 0.5 (1 - 2/3).
    t = torch.tensor([[[[1.0, 2.0]], [[0.5, 1.0]]]])  # (1, D=2, 1, 2): both tokens along (2, 1)
    assert ptc_loss(t, torch.tensor([[[4, 4]]])).item() == pytest.approx(1 / 6)
    # Same tokens, different labels: 2 negative pairs with cos 1 -> 0.5 + 0.5 * 2/3.
    assert ptc_loss(t, torch.tensor([[[4, 5]]])).item() == pytest.approx(0.5 + 1 / 3)
    # Anti-parallel tokens count as |cos| = 1, so they are NOT good negatives.
    anti = torch.tensor([[[[1.0, -1.0]], [[0.0, 0.0]]]])
    assert ptc_loss(anti, torch.tensor([[[1, 2]]])).item() == pytest.approx(0.5 + 1 / 3)
    # Everything ignored: 0.5 (1 - 0) + 0.
    assert ptc_loss(t, torch.tensor([[[255, 255]]])).item() == pytest.approx(0.5)


def naive_ctc(student, teacher, flags, temp, add_neg):
    b, v = flags.shape
    total = 0.0
    for i in range(b):
        s = [student[j * b + i] for j in range(v)]
        t = [teacher[a * b + i] for a in range(2)]
        pos = [j for j in range(v) if flags[i, j] == 1]
        neg = [j for j in range(v) if flags[i, j] == 0]
        ls = []
        for a in range(2):
            e = [math.exp(float(t[a] @ s[j]) / temp) for j in range(v)]
            s_neg = sum(e[n] for n in neg)
            la = sum(-math.log(e[j] / (e[j] + s_neg + 1e-4)) for j in pos)
            if add_neg:
                la += math.log(1 + s_neg + 1e-4)
            ls.append(la)
        total += (ls[0] + ls[1]) / 2 / (len(pos) + 1e-4)
    return total / b


@pytest.mark.parametrize("add_neg", [False, True])
def test_ctc_loss_matches_naive_loops(add_neg):
    torch.manual_seed(2)
    b, v, k = 3, 6, 8
    student = torch.randn(v * b, k, dtype=torch.float64)
    teacher = torch.randn(2 * b, k, dtype=torch.float64)
    flags = torch.tensor(
        [[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float32
    )
    got = ctc_loss(student, teacher, flags, 0.5, always_add_negative_term=add_neg)
    assert got.item() == pytest.approx(naive_ctc(student, teacher, flags, 0.5, add_neg), rel=1e-12)


def test_ctc_loss_hand_value_single_image():
    # B=1, V=3, K=1: t = (1, 1), s = (0, 0, 0) so every e = 1; view 2 negative, S_neg = 1.
    student = torch.zeros(3, 1)
    teacher = torch.ones(2, 1)
    flags = torch.tensor([[1.0, 1.0, 0.0]])
    per_view = 2 * -math.log(1 / (2 + 1e-4))
    assert ctc_loss(student, teacher, flags, 1.0).item() == pytest.approx(
        per_view / (2 + 1e-4), rel=1e-6
    )
    bonus = math.log(2 + 1e-4)
    got = ctc_loss(student, teacher, flags, 1.0, always_add_negative_term=True).item()
    assert got == pytest.approx((per_view + bonus) / (2 + 1e-4), rel=1e-6)


@pytest.mark.parametrize("add_neg", [False, True])
def test_ctc_loss_large_dot_products_stay_finite(add_neg):
    torch.manual_seed(3)
    b, v, k = 2, 5, 16
    # Dot products up to 200, so e = exp(200 / 0.5) overflows fp32 (fine in the fp64 reference).
    student = torch.nn.functional.normalize(torch.randn(v * b, k), dim=1) * math.sqrt(200)
    teacher = torch.nn.functional.normalize(torch.randn(2 * b, k), dim=1) * math.sqrt(200)
    student[: 2 * b] = teacher  # global views align with the teacher: dot = 200
    student.requires_grad_(True)
    flags = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 0, 0, 1]], dtype=torch.float32)
    loss = ctc_loss(student, teacher, flags, 0.5, always_add_negative_term=add_neg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    ref = naive_ctc(student.detach().double(), teacher.double(), flags, 0.5, add_neg)
    assert loss.item() == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_seg_loss_hand_values():
    # One image, 3 classes, 3 pixels: labels 0, 2, ignore.
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, 5.0]], [[0.0, 3.0, -5.0]]]])
    label = torch.tensor([[[0, 2, 255]]])

    def ce(z, c):
        return -z[c] + math.log(sum(math.exp(v) for v in z))

    expected = 0.5 * (ce([2.0, 0.0, 0.0], 0) + ce([0.0, 1.0, 3.0], 2))
    assert seg_loss(logits, label).item() == pytest.approx(expected, rel=1e-6)


def test_seg_loss_is_mean_per_part():
    # 3 bg pixels and 1 fg pixel: bg mean over 3, fg mean over 1 (not a mean over all 4).
    torch.manual_seed(4)
    logits = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    label = torch.tensor([[[0, 0], [0, 3]]])
    logp = torch.log_softmax(logits, 1)[0]
    bg = -(logp[0, 0, 0] + logp[0, 0, 1] + logp[0, 1, 0]) / 3
    fg = -logp[3, 1, 1]
    assert seg_loss(logits, label).item() == pytest.approx(0.5 * (bg + fg).item(), rel=1e-12)


def test_seg_loss_all_ignored_is_zero_with_zero_grad():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = seg_loss(logits, torch.full((2, 4, 4), 255))
    (0.0 * loss).backward()  # the warm-up weight 0 must not turn into NaN
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_seg_loss_only_background():
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    label = torch.zeros(2, 2, 3, dtype=torch.long)
    label[1, 0, 0] = 255
    loss = seg_loss(logits, label)
    logp = torch.log_softmax(logits.detach(), 1)[:, 0]
    keep = label == 0
    assert loss.item() == pytest.approx(0.5 * -(logp[keep].sum() / keep.sum()).item(), rel=1e-12)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1, :, 0, 0] == 0).all()


def test_losses_under_autocast_are_fp32_and_close():
    torch.manual_seed(6)
    tokens = torch.randn(2, 16, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    student, teacher = torch.randn(8, 32), torch.randn(4, 32)
    flags = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    logits = torch.randn(2, 3, 4, 4)

    def all_three() -> list[torch.Tensor]:
        return [
            ptc_loss(tokens, labels),
            ctc_loss(student, teacher, flags, 0.5),
            seg_loss(logits, labels),
        ]

    ref = all_three()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = all_three()
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r)
