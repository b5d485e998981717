"""ToCo losses as pure tensor functions (spec section 3).

- multilabel_loss: L_cls, multi-label soft margin on image-level labels (3.1).
- ctc_loss: L_ctc, class-token contrast between teacher global views and student crops (3.2).
- ptc_loss: L_ptc, patch-token contrast on the final-layer token map (3.3).
- seg_loss: L_seg, background/foreground-split cross-entropy on pseudo labels (3.4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _float(x: Tensor) -> Tensor:
    """x in at least fp32: the sums and logs below are unreliable in bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _no_autocast(x: Tensor) -> torch.autocast:
    """Context that keeps matmuls in the inputs' (>= fp32) precision under autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def multilabel_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_cls = -mean_{b,k} [y log sigma(x) + (1 - y) log sigma(-x)] (spec 3.1)."""
    logits = _float(logits)
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def ptc_loss(tokens: Tensor, token_labels: Tensor, ignore_index: int = 255) -> Tensor:
    """L_ptc on tokens F (B, D, h, w) with token pseudo labels (B, h, w) (spec 3.3).

    Target A_ij = 1 if lab_i == lab_j else 0, excluding the diagonal and every pair with an
    ignored token. With X the tokens L2-normalised over D (eps 1e-8) and cos = |X^T X|:
        L = 0.5 (1 - sum_{A=1} cos / (#{A=1} + 1)) + 0.5 sum_{A=0} cos / (#{A=0} + 1),
    sums and counts over the whole batch. Negatives go to |cos| -> 0, not to -1.
    """
    b, d = tokens.shape[:2]
    x = F.normalize(_float(tokens).reshape(b, d, -1), dim=1, eps=1e-8)  # (B, D, N)
    with _no_autocast(x):
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
    """L_ctc between teacher global views and student views (spec 3.2).

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
    with _no_autocast(s):
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
    """L_seg = 0.5 (CE over background pixels + CE over foreground pixels) (spec 3.4).

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
