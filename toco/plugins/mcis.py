"""MCIS: mining cross-image semantics (Sun et al., ECCV 2020) as a ToCo plug-in (seeds spec 3).

Pairs are formed inside the batch (no extra encoder pass): with --mcis the sampler
(`toco.sampling.PairedResumableSampler`) emits each per-rank batch as anchor/partner pairs
(images 2i and 2i + 1) sharing at least one class, and every image is still a normal ToCo sample.

Symbols (paper / official code), for a pair (m, n) of final token maps F_m (N_m x D), F_n:
    S        = (W F_m) F_n^T / sqrt(D)                 affinity, W a bias-free D x D map
    F_n^att  = softmax_m(S)^T F_m,  F_m^att = softmax_n(S) F_n       co-attention
    co_m     = pool(W_co F_m^att)                      co-attention scores (C-1)
    g_m      = sigmoid(w_g F_m^att)                    class-agnostic gate
    ex_m     = pool(W_co (F_m * (1 - g_m)))            contrastive co-attention scores
    L_co     = MLSM([co_m; co_n], [y_m & y_n; y_m & y_n])             common classes
    L_ex     = MLSM([ex_m; ex_n], [y_m - y_common; y_n - y_common])   unshared classes, on the
               images whose unshared label is not empty (official: every image, whenever one
               of the batch has an unshared class; `ex_empty_rows`)
MLSM is the multi-label soft-margin loss; pool is GAP (MCIS) or GMP (ToCo's classifier pooling).

Deviations: the affinity is scaled by 1/sqrt(D) (ViT tokens after LayerNorm make the official
unscaled softmax one-hot); self-pairs (flip / 0.75x / 2x of the anchor) are not implemented.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toco.config import TrainConfig
from toco.errors import ConfigError
from toco.losses import multilabel_loss
from toco.step import LossModule, StepState


class CoAttention(nn.Module):
    """The co-attention head: affinity W, gate w_g and (unless shared) the classifier W_co.

    Args:
        dim: D.
        num_fg_classes: C - 1.
        lowrank_dim: r > 0 factorises W = U V^T (2 D r parameters instead of D^2).
        share_classifier: no own W_co; callers pass ToCo's classifier weight.
    """

    def __init__(self, dim: int, num_fg_classes: int, lowrank_dim: int = 0,
                 share_classifier: bool = False) -> None:
        super().__init__()
        self.dim = dim
        if lowrank_dim > 0:
            self.affinity = nn.Sequential(nn.Linear(dim, lowrank_dim, bias=False),
                                          nn.Linear(lowrank_dim, dim, bias=False))
        else:
            self.affinity = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1, bias=False)
        self.classifier = None if share_classifier else nn.Linear(dim, num_fg_classes,
                                                                  bias=False)

    def attend(self, fm: Tensor, fn: Tensor) -> tuple[Tensor, Tensor]:
        """fm (P, N_m, D), fn (P, N_n, D) -> (F_m^att (P, N_m, D), F_n^att (P, N_n, D))."""
        s = (self.affinity(fm) @ fn.transpose(1, 2)) / math.sqrt(self.dim)  # (P, N_m, N_n)
        s = s.float()
        att_m = s.softmax(dim=2).to(fn.dtype) @ fn
        att_n = s.softmax(dim=1).transpose(1, 2).to(fm.dtype) @ fm
        return att_m, att_n

    def class_weight(self, shared: Optional[Tensor]) -> Tensor:
        """W_co as a (C-1, D) matrix."""
        if self.classifier is not None:
            return self.classifier.weight
        if shared is None:
            raise ConfigError("MCIS shares ToCo's classifier but none was given")
        return shared.reshape(shared.shape[0], -1)

    def suppressed(self, f: Tensor, att: Tensor) -> Tensor:
        """F * (1 - g) with g = sigmoid(w_g F^att): the features outside the co-attended part."""
        return f * (1 - torch.sigmoid(self.gate(att)))


def pooled_scores(x: Tensor, weight: Tensor, pool: str) -> Tensor:
    """pool_N(W_co x) for x (P, N, D): GAP (= W_co of the mean, W_co being linear) or GMP."""
    if pool == "gap":
        return x.mean(dim=1) @ weight.t()
    return (x @ weight.t()).amax(dim=1)


def co_cam(x: Tensor, weight: Tensor, grid: tuple[int, int]) -> Tensor:
    """Class maps W_co x for x (P, N, D), as (P, C-1, h, w)."""
    return (x @ weight.t()).transpose(1, 2).reshape(x.shape[0], -1, *grid)


def row_multilabel_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row multi-label soft margin (P,): mean over classes of the logistic losses."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(1)


class CrossImageSemantics(LossModule):
    """MCIS on in-batch pairs (2i, 2i + 1): `mcis_co` and, from `ex_start`, `mcis_ex`.

    Each term is returned multiplied by its relative weight (w_co, w_ex); the engine applies
    `weight` (--w-mcis) on top.

    Args:
        embed_dim: D.
        num_classes: C, background included.
        weight, start_iter: as for every LossModule.
        w_co, w_ex: relative weights (0 skips a term).
        ex_start: first iteration of L_ex (never before start_iter).
        pool: 'gap' or 'gmp'.
        lowrank_dim, share_classifier: see CoAttention.
        ex_empty_rows: official L_ex rows (every image whenever the batch has an unshared class).
    """

    names = ("mcis_co", "mcis_ex")

    def __init__(self, embed_dim: int, num_classes: int, weight: float = 0.5,
                 start_iter: int = 0, w_co: float = 1.0, w_ex: float = 1.0, ex_start: int = 0,
                 pool: str = "gap", lowrank_dim: int = 0, share_classifier: bool = False,
                 ex_empty_rows: bool = False) -> None:
        super().__init__(weight, start_iter)
        if pool not in ("gap", "gmp"):
            raise ConfigError(f"mcis pool must be 'gap' or 'gmp', got {pool!r}")
        self.head = CoAttention(embed_dim, num_classes - 1, lowrank_dim, share_classifier)
        self.w_co, self.w_ex, self.ex_start = w_co, w_ex, ex_start
        self.pool, self.ex_empty_rows = pool, ex_empty_rows

    def shared_weight(self, state: StepState) -> Optional[Tensor]:
        if self.head.classifier is not None or state.model is None:
            return None
        return state.model.classifier.conv.weight

    def compute(self, state: StepState) -> dict[str, Tensor]:
        tokens = state.feats.tokens
        b = tokens.shape[0]
        if b % 2:
            raise ConfigError(f"MCIS pairs images 2i and 2i+1 of each batch; got {b} images")
        x = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
        fm, fn = x[0::2], x[1::2]
        y = state.cls_label.float()
        ym, yn = y[0::2], y[1::2]
        common = ym * yn
        weight = self.head.class_weight(self.shared_weight(state))
        att_m, att_n = self.head.attend(fm, fn)
        out: dict[str, Tensor] = {}
        if self.w_co > 0:
            co = pooled_scores(torch.cat([att_m, att_n]), weight, self.pool)
            out["mcis_co"] = self.w_co * multilabel_loss(co, torch.cat([common, common]))
        if self.w_ex > 0 and state.iteration >= self.ex_start:
            ex_feats = torch.cat([self.head.suppressed(fm, att_m), self.head.suppressed(fn, att_n)])
            ex = pooled_scores(ex_feats, weight, self.pool)
            y_ex = torch.cat([ym - common, yn - common])
            rows = y_ex.sum(dim=1) > 0
            if self.ex_empty_rows:
                rows = rows.any().expand_as(rows)
            per_row = row_multilabel_loss(ex, y_ex)
            rows = rows.to(per_row.dtype)
            out["mcis_ex"] = self.w_ex * (per_row * rows).sum() / rows.sum().clamp_min(1)
        return out


@torch.no_grad()
def co_attention_cams(model: nn.Module, plugin: CrossImageSemantics, images_m: Tensor,
                      images_n: Tensor) -> tuple[Tensor, Tensor]:
    """Raw co-attention CAMs W_co F^att of paired images (P, 3, H, W) each, at token stride:
    (cam_m (P, C-1, h_m, w_m), cam_n (P, C-1, h_n, w_n)). The images may differ in size."""
    fm, fn = model.encode(images_m).tokens, model.encode(images_n).tokens
    xm, xn = fm.flatten(2).transpose(1, 2), fn.flatten(2).transpose(1, 2)
    shared = model.classifier.conv.weight if plugin.head.classifier is None else None
    weight = plugin.head.class_weight(shared)
    att_m, att_n = plugin.head.attend(xm, xn)
    return (co_cam(att_m, weight, tuple(fm.shape[-2:])),
            co_cam(att_n, weight, tuple(fn.shape[-2:])))


@torch.no_grad()
def cross_image_cam(model: nn.Module, plugin: CrossImageSemantics, image: Tensor,
                    cls_label: Tensor, partners: dict[int, Sequence[Tensor]]) -> Tensor:
    """MCIS inference with related images, for one image (1, 3, H, W) in [0, 1].

    For each present class c: the co-attention CAM of the image w.r.t. each partner in
    `partners[c]` (images containing c, any size), ReLU, normalised by its max, averaged over the
    partners; channel c is kept. Returns (1, C-1, H, W) in [0, 1] (absent classes 0).
    """
    h, w = image.shape[-2:]
    k = cls_label.shape[-1]
    out = image.new_zeros(1, k, h, w)
    for c in torch.nonzero(cls_label.reshape(-1) > 0).flatten().tolist():
        maps = []
        for partner in partners.get(c, ()):
            cam, _ = co_attention_cams(model, plugin, image, partner)
            cam = F.relu(cam[:, c:c + 1].float())
            cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(cam / (cam.amax(dim=(-2, -1), keepdim=True) + 1e-5))
        if maps:
            out[:, c] = torch.stack(maps).mean(0)[:, 0]
    return out


def sample_partners(labels: Tensor, index: int, num: int, rng: random.Random
                    ) -> dict[int, list[int]]:
    """For image `index`, `num` other images (with replacement, never itself unless it is the
    only one) containing each of its classes: {class: [dataset index, ...]}."""
    out: dict[int, list[int]] = {}
    for c in torch.nonzero(labels[index] > 0).flatten().tolist():
        pool = [i for i in torch.nonzero(labels[:, c] > 0).flatten().tolist() if i != index]
        out[c] = [rng.choice(pool or [index]) for _ in range(num)]
    return out


def build_mcis(cfg: TrainConfig, embed_dim: int, num_classes: int) -> CrossImageSemantics:
    start = cfg.plugin_start
    return CrossImageSemantics(
        embed_dim, num_classes, weight=cfg.w_mcis, start_iter=start, w_co=cfg.mcis_w_co,
        w_ex=cfg.mcis_w_ex, ex_start=max(start, cfg.mcis_ex_start_iter), pool=cfg.mcis_pool,
        lowrank_dim=cfg.mcis_lowrank_dim, share_classifier=cfg.mcis_share_classifier,
        ex_empty_rows=cfg.mcis_ex_empty_rows)

