"""ToCo losses as pure tensor functions (S3 in docs/fidelity.md).

- multilabel_loss: L_cls, multi-label soft margin on image-level labels (3.1).
- ctc_loss: L_ctc, class-token contrast between teacher global views and student crops (3.2).
- ptc_loss: L_ptc, patch-token contrast on the final-layer token map (3.3).
- seg_loss: L_seg, background/foreground-split cross-entropy on pseudo labels (3.4).

The same terms as `LossModule`s (ClassificationLoss, PatchTokenContrast, ClassTokenContrast,
SegmentationLoss) follow: the engine treats them exactly like plug-ins.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from toco.method.step import LossModule, StepState
from toco.runtime import full_precision


def _float(x: Tensor) -> Tensor:
    """x in at least fp32: the sums and logs below are unreliable in bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def multilabel_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_cls = -mean_{b,k} [y log sigma(x) + (1 - y) log sigma(-x)] (S3.1)."""
    logits = _float(logits)
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def ptc_loss(tokens: Tensor, token_labels: Tensor, ignore_index: int = 255) -> Tensor:
    """L_ptc on tokens F (B, D, h, w) with token pseudo labels (B, h, w) (S3.3).

    Target A_ij = 1 if lab_i == lab_j else 0, excluding the diagonal and every pair with an
    ignored token. With X the tokens L2-normalised over D (eps 1e-8) and cos = |X^T X|:
        L = 0.5 (1 - sum_{A=1} cos / (#{A=1} + 1)) + 0.5 sum_{A=0} cos / (#{A=0} + 1),
    sums and counts over the whole batch. Negatives go to |cos| -> 0, not to -1.
    """
    b, d = tokens.shape[:2]
    x = F.normalize(_float(tokens).reshape(b, d, -1), dim=1, eps=1e-8)  # (B, D, N)
    with full_precision(x):
        cos = torch.bmm(x.transpose(1, 2), x).abs()  # (B, N, N)
    lab = token_labels.reshape(b, -1).to(cos.device)
    keep = lab != ignore_index
    valid = keep[:, :, None] & keep[:, None, :]
    valid &= ~torch.eye(lab.shape[1], dtype=torch.bool, device=lab.device)
    same = lab[:, :, None] == lab[:, None, :]
    pos, neg = valid & same, valid & ~same
    zero = cos.new_zeros(())
    pos_term = torch.where(pos, cos, zero).sum() / (pos.sum() + 1)
    neg_term = torch.where(neg, cos, zero).sum() / (neg.sum() + 1)
    return 0.5 * (1 - pos_term) + 0.5 * neg_term


def ctc_loss(
    student: Tensor,
    teacher: Tensor,
    flags: Tensor,
    temperature: float,
    always_add_negative_term: bool = False,
) -> Tensor:
    """L_ctc between teacher global views and student views (S3.2).

    student (V*B, K) and teacher (2*B, K) are view-major (all images' view 0, then view 1, ...);
    flags (B, V): 1 = positive view, 0 = negative (views 0 and 1 are the global views, always
    positive). With e_aj = exp(<t_a, s_j> / temperature) per image and S_neg = sum_{n in N} e_an:
        l_a = sum_{j in P} -log(e_aj / (e_aj + S_neg + 1e-4))  [+ log(1 + S_neg + 1e-4)]
    where the bracketed term is added when always_add_negative_term (reference bug B3: its
    for-else always adds it). loss_i = (l_0 + l_1) / 2 / (|P| + 1e-4); L = mean over images.

    Evaluated in log space (logsumexp / logaddexp), so large dot products stay finite.
    """
    b, v = flags.shape
    if student.shape[0] != v * b or teacher.shape[0] != 2 * b:
        raise ValueError(
            f"ctc_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} do not "
            f"match flags {tuple(flags.shape)} (expected {v}*{b} and 2*{b} rows)"
        )
    s = _float(student).reshape(v, b, -1).transpose(0, 1)  # (B, V, K)
    t = _float(teacher).reshape(2, b, -1).transpose(0, 1).to(s.dtype)  # (B, 2, K)
    with full_precision(s):
        z = torch.bmm(t, s.transpose(1, 2)) / temperature  # log e: (B, 2, V)
    positive = (flags.to(z.device) > 0)[:, None, :]  # (B, 1, V)
    # log(S_neg + 1e-4) = logsumexp over the negatives' z and log(1e-4).
    z_neg = z.masked_fill(positive, float("-inf"))
    eps_col = z.new_full((b, 2, 1), math.log(1e-4))
    log_s = torch.logsumexp(torch.cat([z_neg, eps_col], dim=2), dim=2, keepdim=True)  # (B, 2, 1)
    # -log(e / (e + S)) = log(1 + S / e) = logaddexp(0, log S - z); exact, unlike softplus.
    per_view = torch.logaddexp(torch.zeros_like(z), log_s - z)
    l_a = torch.where(positive, per_view, torch.zeros_like(z)).sum(dim=2)  # (B, 2)
    if always_add_negative_term:
        l_a = l_a + torch.logaddexp(torch.zeros_like(log_s), log_s).squeeze(2)  # log(1 + S)
    n_pos = positive.squeeze(1).sum(dim=1).to(z.dtype)
    return (l_a.sum(dim=1) / 2 / (n_pos + 1e-4)).mean()


def seg_loss(logits: Tensor, label: Tensor, ignore_index: int = 255) -> Tensor:
    """L_seg = 0.5 (CE over background pixels + CE over foreground pixels) (S3.4).

    Each CE is a mean over its own valid pixels in the batch. A part with no valid pixel
    contributes exactly 0 with a zero gradient (the original PyTorch's behaviour; modern
    F.cross_entropy gives 0/0 = NaN there, reference bug B4).
    """
    label = label.to(device=logits.device, dtype=torch.long)
    ce = F.cross_entropy(_float(logits), label, ignore_index=ignore_index, reduction="none")
    bg = label == 0
    fg = (label > 0) & (label != ignore_index)
    zero = ce.new_zeros(())
    # sum / max(n, 1): an empty part is a sum over nothing = 0, never 0/0.
    bg_ce = torch.where(bg, ce, zero).sum() / bg.sum().clamp_min(1)
    fg_ce = torch.where(fg, ce, zero).sum() / fg.sum().clamp_min(1)
    return 0.5 * (bg_ce + fg_ce)


# ---- the terms as LossModules ------------------------------------------------------------------
def grouped_mean(fn: Callable[..., Tensor], group_size: int, *tensors: Tensor) -> Tensor:
    """fn over consecutive groups of `group_size` images, averaged (0: one group).

    ToCo normalises PTC and seg over each GPU's 2-image batch; grouping reproduces that on
    any number of devices.
    """
    batch = tensors[0].shape[0]
    if group_size <= 0 or group_size >= batch:
        return fn(*tensors)
    return torch.stack(
        [fn(*(t[i : i + group_size] for t in tensors)) for i in range(0, batch, group_size)]
    ).mean()


class GroupedLossModule(LossModule):
    """A loss normalised over groups of `group_size` images (see `grouped_mean`)."""

    def __init__(self, weight: float, start_iter: int = 0, group_size: int = 0) -> None:
        super().__init__(weight, start_iter)
        self.group_size = group_size


class ClassificationLoss(LossModule):
    """Multi-label soft-margin loss on the final (`cls`) and aux (`cls_aux`) image logits."""

    names = ("cls", "cls_aux")

    def compute(self, state: StepState) -> dict[str, Tensor]:
        return {
            "cls": multilabel_loss(state.logits, state.cls_label),
            "cls_aux": multilabel_loss(state.aux_logits, state.cls_label),
        }


class PatchTokenContrast(GroupedLossModule):
    """PTC: pull final-layer tokens of the same aux-CAM label together, push others apart."""

    names = ("ptc",)

    def compute(self, state: StepState) -> dict[str, Tensor]:
        return {
            "ptc": grouped_mean(ptc_loss, self.group_size, state.feats.tokens, state.token_label)
        }


class ClassTokenContrast(LossModule):
    """CTC: teacher class tokens of the global views vs student class tokens of all crops."""

    names = ("ctc",)

    def __init__(
        self,
        weight: float,
        start_iter: int = 0,
        temperature: float = 0.5,
        always_add_negative_term: bool = False,
    ) -> None:
        super().__init__(weight, start_iter)
        self.temperature = temperature
        self.always_add_negative_term = always_add_negative_term

    def compute(self, state: StepState) -> dict[str, Tensor]:
        out = state.ctc
        return {
            "ctc": ctc_loss(
                out.student,
                out.teacher,
                out.flags,
                self.temperature,
                always_add_negative_term=self.always_add_negative_term,
            )
        }


class SegmentationLoss(GroupedLossModule):
    """Background/foreground-balanced CE of the decoder against the refined pseudo label."""

    names = ("seg",)
    needs_decoder = True

    def compute(self, state: StepState) -> dict[str, Tensor]:
        label = state.pseudo_label
        logits = F.interpolate(
            state.seg_logits, size=label.shape[-2:], mode="bilinear", align_corners=False
        )
        return {"seg": grouped_mean(seg_loss, self.group_size, logits, label)}
