"""MCIS: mining cross-image semantics (Sun et al., ECCV 2020) as a ToCo plug-in
(design notes: docs/plugins.md).

Pairs are formed inside the batch (no extra encoder pass): with --mcis the sampler
(`toco.train.sampling.PairedResumableSampler`) emits each per-rank batch as anchor/partner pairs
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

Related-image maps fused into the pseudo labels (default, `co_cam: online_fuse`, `co_cam_partners:
related`): the paper's inference with related images, during training. For every image and each of
its classes c, `co_cam_num_partners` (3) partners are drawn from a bank of the final tokens of the
most recent training images containing c (`PartnerBank`, no extra encoder pass; the partners' tokens
come from the step that trained on them), plus self-pairs with the image's own views from ToCo's
multi-scale CAM passes (the mirror image at scale 1, always counted, and the other CAM scales: 0.5
and 1.5 on VOC instead of the official 0.75 and 2, which would need extra passes). Each map is
ReLU'd, upsampled and max-normalised, counts when sigmoid(its mean) > 0.1, and the class map is the
sum of the counted maps over the number of maps (the official scorer's rule, `related_image_maps`);
it is averaged (`co_cam_fuse: mean`) with the CAM the pixel pseudo labels are refined from, on the
image's classes (`LossModule.pseudo_label_cam`).
`co_cam_partners: in_batch` is the earlier fusion: only the in-batch partner's co-attention CAM
(and the mirror pair's with `self_pairs`), min-max normalised, on the classes the pair shares.

Self-pairs (`self_pairs`): the anchor paired with its mirror image (one extra encoder pass with
grad), L_self = MLSM(co-attention scores of both sides, [y; y]). The official code also pairs
it with 0.75x and 2x resizes; those are only in the offline scorer (toco.evaluation.mcis).

Deviation: the affinity is scaled by 1/sqrt(D) (ViT tokens after LayerNorm make the official
unscaled softmax one-hot).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toco.errors import ConfigError
from toco.method.losses import multilabel_loss
from toco.method.step import CAM_VIEWS, LossModule, StepState
from toco.plugins.common import minmax_normalise, step_generator
from toco.plugins.registry import BuildContext, Plugin, PluginSettings, register, setting


class CoAttention(nn.Module):
    """The co-attention head: affinity W, gate w_g and (unless shared) the classifier W_co.

    Args:
        dim: D.
        num_fg_classes: C - 1.
        lowrank_dim: r > 0 factorises W = U V^T (2 D r parameters instead of D^2).
        share_classifier: no own W_co; callers pass ToCo's classifier weight.
    """

    def __init__(
        self, dim: int, num_fg_classes: int, lowrank_dim: int = 0, share_classifier: bool = False
    ) -> None:
        super().__init__()
        self.dim = dim
        if lowrank_dim > 0:
            self.affinity = nn.Sequential(
                nn.Linear(dim, lowrank_dim, bias=False), nn.Linear(lowrank_dim, dim, bias=False)
            )
        else:
            self.affinity = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1, bias=False)
        self.classifier = None if share_classifier else nn.Linear(dim, num_fg_classes, bias=False)

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


def normalised_related_map(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """The official per-map normalisation of a co-attention map (P, 1, h, w) -> (P, 1, H, W):
    ReLU, bilinear upsampling to `size`, divided by its maximum."""
    m = F.interpolate(F.relu(raw.float()), size=size, mode="bilinear", align_corners=False)
    return m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-5)


def passes_score_filter(raw: Tensor, score_thr: float) -> Tensor:
    """The official score filter of raw maps (P, 1, h, w): sigmoid(mean) > score_thr, (P,)."""
    return torch.sigmoid(raw.float().mean(dim=(1, 2, 3))) > score_thr


class PartnerBank(nn.Module):
    """Per class, the final tokens of the `size` most recent training images containing it
    (FIFO, detached, float16): the related images the co-attention CAMs are taken against.

    Buffers (persistent, so a resumed run draws the partners the uninterrupted one drew):
    `tokens` (K, S, N, D), `ptr` (K,), `count` (K,)."""

    def __init__(self, num_fg_classes: int, size: int, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer(
            "tokens", torch.zeros(num_fg_classes, size, num_tokens, dim, dtype=torch.float16)
        )
        self.register_buffer("ptr", torch.zeros(num_fg_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_fg_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, x: Tensor, labels: Tensor) -> None:
        """Write image b's tokens x[b] (N, D) into the queue of each class it contains, in order
        of b. Images whose token count differs from the bank's are skipped (other crop)."""
        if x.shape[1:] != self.tokens.shape[2:]:
            return
        for b, c in torch.nonzero(labels > 0).tolist():
            slot = int(self.ptr[c])
            self.tokens[c, slot] = x[b].to(self.tokens.dtype)
            self.ptr[c] = (slot + 1) % self.size
            self.count[c] = min(int(self.count[c]) + 1, self.size)

    def draw(
        self, labels: Tensor, num: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """For every (image b, class c) with labels[b, c] > 0 and a non-empty queue, `num`
        partners drawn with replacement: (image (P,), class (P,), tokens (P, N, D))."""
        pairs = torch.nonzero(labels > 0)
        pairs = pairs[self.count[pairs[:, 1]] > 0].repeat_interleave(num, dim=0)
        if pairs.numel() == 0:
            empty = pairs.new_zeros(0)
            return empty, empty, self.tokens.new_zeros(0, *self.tokens.shape[2:])
        u = torch.rand(pairs.shape[0], generator=generator, device=generator.device)
        slot = (u.to(self.tokens.device) * self.count[pairs[:, 1]]).long()
        slot = slot.clamp_max(self.count[pairs[:, 1]] - 1)
        return pairs[:, 0], pairs[:, 1], self.tokens[pairs[:, 1], slot]


def related_image_maps(
    head: "CoAttention",
    weight: Tensor,
    x: Tensor,
    grid: tuple[int, int],
    labels: Tensor,
    partners: tuple[Tensor, Tensor, Tensor],
    self_views: Sequence[tuple[bool, Tensor, tuple[int, int]]],
    size: tuple[int, int],
    score_thr: float,
) -> tuple[Tensor, Tensor]:
    """MCIS's localisation maps with related images, for a batch (the official scorer's rule).

    x: final tokens (B, N, D) on `grid`; labels: (B, K); partners: (image, class, tokens) from
    `PartnerBank.draw`; self_views: (mirrored, always counted, tokens (B, N', D), grid') of the
    image's own rescaled / mirrored views (official: the mirror image, always counted, and
    0.75x and 2x resizes). For image b and present class c, the maps are channel c of
    - the co-attention CAM of b w.r.t. each of its class-c partners (b's side);
    - the partner side of the pair (b, view) for each self-view (mirrored back).
    Each map is normalised (`normalised_related_map`) and counts when it passes the score
    filter (or is always counted); the class map is the sum of the counted maps divided
    by the number of maps, counted or not. Returns (maps (B, K, H, W), number of maps (B, K)).
    """
    b, k = labels.shape
    total = x.new_zeros(b, k, *size, dtype=torch.float32)
    count = x.new_zeros(b, k, dtype=torch.float32)
    image, cls, tokens = partners
    if image.numel():
        att, _ = head.attend(x[image], tokens.to(x.dtype))
        raw = co_cam(att, weight, grid)  # (P, K, h, w)
        raw = raw.gather(1, cls[:, None, None, None].expand(-1, 1, *grid))
        keep = passes_score_filter(raw, score_thr).to(torch.float32)
        maps = normalised_related_map(raw, size)[:, 0] * keep[:, None, None]
        flat = image * k + cls
        total.view(b * k, *size).index_add_(0, flat, maps)
        count.view(-1).index_add_(0, flat, torch.ones_like(keep))
    present = (labels > 0).to(torch.float32)
    for mirrored, always, view, view_grid in self_views:
        _, att_view = head.attend(x, view.to(x.dtype))
        raw = co_cam(att_view, weight, view_grid)  # (B, K, h', w'), the view's side
        if mirrored:
            raw = raw.flip(-1)
        keep = (
            torch.ones(b, k, device=x.device)
            if always
            else passes_score_filter(raw.reshape(b * k, 1, *view_grid), score_thr)
            .reshape(b, k)
            .to(torch.float32)
        )
        maps = normalised_related_map(raw.reshape(b * k, 1, *view_grid), size).reshape(b, k, *size)
        total += maps * (keep * present)[..., None, None]
        count += present
    return total / count.clamp_min(1)[..., None, None], count


def normalised_class_maps(maps: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """The related-image class maps (B, K, H, W) min-max normalised per (image, class), as the
    official pseudo-label step normalises them before its thresholds; `count` (B, K, 1, 1) set
    to 0 where a class map is empty (every map filtered or ReLU'd away), so that class keeps the
    CAM instead of being averaged with zeros."""
    has_evidence = maps.amax(dim=(-2, -1), keepdim=True) > 0
    return minmax_normalise(maps), count * has_evidence


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
        self_pairs: pair each image with its mirror image too (`mcis_self`, one extra pass).
        co_cam: 'online_fuse' fuses the co-attention CAMs into the pseudo-label CAM; 'off'.
        co_cam_fuse: 'max' or 'mean' of the two normalised maps.
        co_cam_start: first iteration of the fusion (never before start_iter).
    """

    names = ("mcis_co", "mcis_ex", "mcis_self")

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        weight: float = 0.5,
        start_iter: int = 0,
        w_co: float = 1.0,
        w_ex: float = 1.0,
        ex_start: int = 0,
        pool: str = "gap",
        lowrank_dim: int = 0,
        share_classifier: bool = False,
        ex_empty_rows: bool = False,
        self_pairs: bool = False,
        co_cam: str = "off",
        co_cam_fuse: str = "max",
        co_cam_start: int = 0,
        co_cam_partners: str = "in_batch",
        num_partners: int = 3,
        bank_size: int = 3,
        bank_tokens: int = 0,
        co_cam_self_views: bool = True,
        score_thr: float = 0.1,
        co_cam_normalise: bool = True,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        super().__init__(weight, start_iter)
        if co_cam_partners not in ("related", "in_batch"):
            raise ConfigError(
                f"mcis co_cam_partners must be related or in_batch, got {co_cam_partners!r}"
            )
        if pool not in ("gap", "gmp"):
            raise ConfigError(f"mcis pool must be 'gap' or 'gmp', got {pool!r}")
        if co_cam not in ("off", "online_fuse") or co_cam_fuse not in ("max", "mean"):
            raise ConfigError(
                f"mcis co_cam must be off/online_fuse and co_cam_fuse max/mean, "
                f"got {co_cam!r}, {co_cam_fuse!r}"
            )
        self.head = CoAttention(embed_dim, num_classes - 1, lowrank_dim, share_classifier)
        self.w_co, self.w_ex, self.ex_start = w_co, w_ex, ex_start
        self.pool, self.ex_empty_rows = pool, ex_empty_rows
        self.self_pairs, self.co_cam, self.co_cam_fuse = self_pairs, co_cam, co_cam_fuse
        self.co_cam_start = max(start_iter, co_cam_start)
        self.co_cam_partners, self.num_partners = co_cam_partners, num_partners
        self.co_cam_self_views, self.score_thr = co_cam_self_views, score_thr
        self.co_cam_normalise = co_cam_normalise
        self.seed, self.rank = seed, rank
        related = co_cam == "online_fuse" and co_cam_partners == "related"
        # The related-image maps take the image's own views from ToCo's CAM passes.
        self.needs_cam_views = related and co_cam_self_views
        self.bank = (
            PartnerBank(num_classes - 1, bank_size, bank_tokens, embed_dim) if related else None
        )

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
        if self.bank is not None:  # after this step's pseudo labels drew their partners
            self.bank.push(x.detach(), state.cls_label)
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
        if self.self_pairs:
            xf = self._mirror_tokens(state).flatten(2).transpose(1, 2)
            att_x, att_f = self.head.attend(x, xf)
            scores = pooled_scores(torch.cat([att_x, att_f]), weight, self.pool)
            out["mcis_self"] = multilabel_loss(scores, torch.cat([y, y]))
        return out

    @staticmethod
    def _mirror_tokens(state: StepState) -> Tensor:
        """Final tokens of the mirrored main view (one extra encoder pass with grad, cached)."""
        if state.model is None:
            raise RuntimeError("MCIS self-pairs need StepState.model (the mirror image's pass)")
        return state.rescaled_view(1.0, flip=True)[1].tokens

    def co_attention_maps(self, state: StepState) -> tuple[Tensor, Tensor]:
        """Normalised co-attention CAMs of every image of the step and where they apply:
        (maps (B, C-1, H, W) in [0, 1], weight (B, C-1, 1, 1) = number of maps averaged per
        class). Partner maps apply to the classes a pair shares, self-pair maps to all."""
        tokens = state.feats.tokens.detach()
        b, _, h, w = tokens.shape
        x = tokens.flatten(2).transpose(1, 2)
        weight = self.head.class_weight(self.shared_weight(state)).detach()
        y = state.cls_label.float()
        att_m, att_n = self.head.attend(x[0::2], x[1::2])
        paired = torch.empty_like(x)
        paired[0::2], paired[1::2] = att_m, att_n
        common = torch.empty_like(y)
        common[0::2] = common[1::2] = y[0::2] * y[1::2]
        size = tuple(state.cam.shape[-2:])
        maps = self._normalised(co_cam(paired, weight, (h, w)), size) * common[..., None, None]
        count = common.clone()
        if self.self_pairs:
            xf = self._mirror_tokens(state).detach().flatten(2).transpose(1, 2)
            att_x, _ = self.head.attend(x, xf)
            maps = maps + self._normalised(co_cam(att_x, weight, (h, w)), size) * y[..., None, None]
            count = count + y
        return maps / count.clamp_min(1)[..., None, None], count[..., None, None]

    @staticmethod
    def _normalised(cam: Tensor, size: tuple[int, int]) -> Tensor:
        """ReLU, bilinear upsampling to `size`, min-max per (image, class): as ToCo's CAM."""
        cam = F.interpolate(F.relu(cam.float()), size=size, mode="bilinear", align_corners=False)
        return minmax_normalise(cam)

    def related_maps(self, state: StepState) -> tuple[Tensor, Tensor]:
        """The related-image maps of every image of the step (`related_image_maps`): partners
        from the bank of recent training images, self-pairs with the views of ToCo's CAM
        passes (the mirror image at scale 1, always counted, and the other CAM scales); as
        (maps (B, C-1, H, W), number of maps (B, C-1, 1, 1))."""
        tokens = state.feats.tokens.detach()
        grid = tuple(tokens.shape[-2:])
        x = tokens.flatten(2).transpose(1, 2)
        weight = self.head.class_weight(self.shared_weight(state)).detach()
        gen = step_generator(tokens.device, self.seed, state.iteration, self.rank, 0x4D4349)
        partners = self.bank.draw(state.cls_label, self.num_partners, gen)
        views = []
        if self.co_cam_self_views:
            for scale, mirrored, out in state.extras.get(CAM_VIEWS, ()):
                if mirrored == (scale == 1.0):  # the mirror image, and the other scales
                    views.append(
                        (
                            mirrored,
                            mirrored,
                            out.detach().flatten(2).transpose(1, 2),
                            tuple(out.shape[-2:]),
                        )
                    )
        maps, count = related_image_maps(
            self.head,
            weight,
            x,
            grid,
            state.cls_label,
            partners,
            views,
            tuple(state.cam.shape[-2:]),
            self.score_thr,
        )
        return maps, count[..., None, None]

    def pseudo_label_cam(self, state: StepState, cam: Tensor) -> Tensor:
        """Online fusion (co_cam 'online_fuse'): max / mean of the CAM and the co-attention map
        on the classes that have one; elsewhere, or with 'off', the CAM unchanged."""
        if self.co_cam == "off" or state.iteration < self.co_cam_start:
            return cam
        if self.bank is None:
            maps, count = self.co_attention_maps(state)
        else:
            maps, count = self.related_maps(state)
            if self.co_cam_normalise:
                maps, count = normalised_class_maps(maps, count)
        fused = torch.maximum(cam, maps) if self.co_cam_fuse == "max" else (cam + maps) / 2
        return torch.where(count > 0, fused.to(cam.dtype), cam)


@torch.no_grad()
def co_attention_cams(
    model: nn.Module, plugin: CrossImageSemantics, images_m: Tensor, images_n: Tensor
) -> tuple[Tensor, Tensor]:
    """Raw co-attention CAMs W_co F^att of paired images (P, 3, H, W) each, at token stride:
    (cam_m (P, C-1, h_m, w_m), cam_n (P, C-1, h_n, w_n)). The images may differ in size."""
    return _pair_cams(
        plugin,
        _class_weight(model, plugin),
        model.encode(images_m).tokens,
        model.encode(images_n).tokens,
    )


def _class_weight(model: nn.Module, plugin: CrossImageSemantics) -> Tensor:
    shared = model.classifier.conv.weight if plugin.head.classifier is None else None
    return plugin.head.class_weight(shared)


def _pair_cams(
    plugin: CrossImageSemantics, weight: Tensor, fm: Tensor, fn: Tensor
) -> tuple[Tensor, Tensor]:
    """co_attention_cams from the two sides' token maps (P, D, h, w)."""
    xm, xn = fm.flatten(2).transpose(1, 2), fn.flatten(2).transpose(1, 2)
    att_m, att_n = plugin.head.attend(xm, xn)
    return (
        co_cam(att_m, weight, tuple(fm.shape[-2:])),
        co_cam(att_n, weight, tuple(fn.shape[-2:])),
    )


# The official scorer's self-pairs: the image paired with its mirror, a 0.75x and a 2x resize.
SELF_PAIRS: tuple[tuple[str, float], ...] = (("flip", 1.0), ("scale", 0.75), ("scale", 2.0))


def _self_partner(image: Tensor, kind: str, scale: float) -> Tensor:
    if kind == "flip":
        return image.flip(-1)
    h, w = image.shape[-2:]
    return F.interpolate(
        image,
        size=(max(1, round(h * scale)), max(1, round(w * scale))),
        mode="bilinear",
        align_corners=False,
    )


@torch.no_grad()
def cross_image_cam(
    model: nn.Module,
    plugin: CrossImageSemantics,
    image: Tensor,
    cls_label: Tensor,
    partners: dict[int, Sequence[Tensor]],
    self_pairs: bool = True,
    score_thr: float = 0.1,
) -> Tensor:
    """MCIS inference with related images (the official scorer), for one image (1, 3, H, W) in
    [0, 1].

    For each present class c, the raw co-attention maps of channel c:
    - of the image w.r.t. each partner in `partners[c]` (images containing c, any size);
    - with `self_pairs`, of the *partner side* of the pairs (image, mirror image) (mirrored
      back), (image, 0.75x image) and (image, 2x image).
    Each map is ReLU'd, divided by its max and upsampled to (H, W). A map counts when
    sigmoid(mean of its raw values) > `score_thr` (the mirror pair's always counts); the channel
    is the sum of the counted maps divided by the number of maps, counted or not (the official
    rule). Returns (1, C-1, H, W) in [0, 1] (absent classes 0). The single-image CAM is not used.
    """
    h, w = image.shape[-2:]
    k = cls_label.shape[-1]
    present = torch.nonzero(cls_label.reshape(-1) > 0).flatten().tolist()
    weight, tokens = _class_weight(model, plugin), model.encode(image).tokens  # encoded once

    def with_partner(partner: Tensor) -> tuple[Tensor, Tensor]:
        return _pair_cams(plugin, weight, tokens, model.encode(partner).tokens)

    # (raw maps (1, C-1, h', w'), always counted?) shared by all classes: the self-pairs
    shared = []
    if self_pairs:
        for kind, scale in SELF_PAIRS:
            _, cam = with_partner(_self_partner(image, kind, scale))
            shared.append((cam.flip(-1) if kind == "flip" else cam, kind == "flip"))
    out = image.new_zeros(1, k, h, w)
    for c in present:
        maps = [(with_partner(partner)[0], False) for partner in partners.get(c, ())] + shared
        total = image.new_zeros(1, 1, h, w)
        for cam, always in maps:
            raw = cam[:, c : c + 1].float()
            if not always and not bool(passes_score_filter(raw, score_thr)):
                continue
            total += normalised_related_map(raw, (h, w))
        if maps:
            out[:, c] = total[:, 0] / len(maps)
    return out


def sample_partners(
    image_label: Tensor,
    pool_labels: Tensor,
    num: int,
    rng: random.Random,
    exclude: Optional[int] = None,
) -> dict[int, list[int]]:
    """For an image with multi-hot `image_label` (C-1,), `num` images of the partner pool
    (`pool_labels` (N, C-1), e.g. the training split) containing each of its classes, drawn
    with replacement: {class: [pool index, ...]}. `exclude`: the image's own pool index, never
    drawn unless it is the only candidate. A class no pool image has gets no partner."""
    out: dict[int, list[int]] = {}
    for c in torch.nonzero(image_label > 0).flatten().tolist():
        pool = [
            i for i in torch.nonzero(pool_labels[:, c] > 0).flatten().tolist() if i != exclude
        ] or ([exclude] if exclude is not None and pool_labels[exclude, c] > 0 else [])
        out[c] = [rng.choice(pool) for _ in range(num)] if pool else []
    return out


@dataclass
class MCISSettings(PluginSettings):
    """MCIS's settings (YAML section `plugins: {mcis: ...}`, flags `--mcis-*`)."""

    # `before=`: what stored configs that predate a setting did (before the related-image maps,
    # the fusion used the in-batch partner's map only).
    weight: float = setting(0.5, "weight of the MCIS co-attention losses")
    pair_policy: str = setting(
        "share_one",
        "partner of each anchor: an image sharing a class, or any image",
        ["share_one", "random"],
    )
    w_co: float = setting(1.0, "relative weight of the co-attention (common classes) loss")
    w_ex: float = setting(
        1.0, "relative weight of the contrastive co-attention (unshared classes) loss"
    )
    ex_start_iter: int = setting(0, "unshared-class loss from max(plug-in start, this)")
    pool: str = setting("gap", "pooling of the co-attention CAMs", ["gap", "gmp"])
    share_classifier: bool = setting(
        False, "co-attention CAMs use ToCo's classifier instead of their own"
    )
    lowrank_dim: int = setting(0, "affinity W = U V^T of this rank (0: full D x D)")
    ex_empty_rows: bool = setting(
        False,
        "unshared-class loss also on images whose unshared "
        "label is empty, whenever the batch has one (official)",
    )
    self_pairs: bool = setting(
        False,
        "also pair each image with its mirror image (loss mcis_self; +1 encoder pass with grad)",
    )
    co_cam: str = setting(
        "online_fuse",
        "online_fuse: fuse the co-attention maps into the CAM "
        "the pseudo labels are refined from (the paper's inference with related "
        "images); off",
        ["off", "online_fuse"],
    )
    co_cam_fuse: str = setting(
        "mean", "how the co-attention map is fused with the CAM", ["max", "mean"]
    )
    co_cam_partners: str = setting(
        "related",
        "partners of the fused maps: co_cam_num_partners "
        "recent training images per class of the image, plus "
        "self-pairs, averaged with the score filter (related, "
        "official); or the in-batch partner only (in_batch)",
        ["related", "in_batch"],
        before="in_batch",
    )
    co_cam_num_partners: int = setting(
        3, "related partners per class of the image (official 3; drawn with replacement)"
    )
    co_cam_bank_size: int = setting(
        3,
        "training images kept per class as partners (their final "
        "tokens, float16, in the checkpoint)",
    )
    co_cam_self_views: bool = setting(
        True,
        "self-pairs of the related maps: the image with its "
        "mirror image and its other CAM scales (ToCo's CAM passes, "
        "no extra encoder pass)",
    )
    co_cam_score_thr: float = setting(
        0.1,
        "a related map counts when sigmoid(its mean) exceeds "
        "this (official 0.1; the mirror pair always counts)",
    )
    co_cam_normalise: bool = setting(
        True,
        "related maps: each class map min-max normalised before the fusion, as the official "
        "pseudo-label step (gen_gt) does; a class whose maps are all empty keeps its CAM",
        before=False,
    )
    co_cam_start_iter: int = setting(
        0, "fusion from max(plug-in start, this): the co-attention head starts untrained"
    )

    def check(self, cfg, need, key) -> None:
        for name in ("co_cam_num_partners", "co_cam_bank_size"):
            need(
                getattr(self, name) > 0, f"{key(name)} must be positive, got {getattr(self, name)}"
            )
        need(
            0 <= self.co_cam_score_thr < 1,
            f"{key('co_cam_score_thr')} must be in [0, 1), got {self.co_cam_score_thr}",
        )
        for name in ("w_co", "w_ex", "ex_start_iter", "lowrank_dim", "co_cam_start_iter"):
            need(getattr(self, name) >= 0, f"{key(name)} must be >= 0, got {getattr(self, name)}")
        need(
            cfg.batch_size % 2 == 0,
            f"MCIS pairs the images of each batch: --batch-size {cfg.batch_size} is odd",
        )
        need(
            self.w_co > 0 or self.w_ex > 0 or self.self_pairs,
            f"MCIS with {key('w_co')} and {key('w_ex')} both 0 computes nothing",
        )


def build_mcis(s: MCISSettings, ctx: BuildContext) -> list[LossModule]:
    start = s.start(ctx.cfg)
    patch = ctx.model.patch_size if ctx.model is not None else 16
    return [
        CrossImageSemantics(
            ctx.embed_dim,
            ctx.num_classes,
            weight=s.weight,
            start_iter=start,
            w_co=s.w_co,
            w_ex=s.w_ex,
            ex_start=max(start, s.ex_start_iter),
            pool=s.pool,
            lowrank_dim=s.lowrank_dim,
            share_classifier=s.share_classifier,
            ex_empty_rows=s.ex_empty_rows,
            self_pairs=s.self_pairs,
            co_cam=s.co_cam,
            co_cam_fuse=s.co_cam_fuse,
            co_cam_start=s.co_cam_start_iter,
            co_cam_partners=s.co_cam_partners,
            num_partners=s.co_cam_num_partners,
            bank_size=s.co_cam_bank_size,
            bank_tokens=(ctx.cfg.crop_size // patch) ** 2,
            co_cam_self_views=s.co_cam_self_views,
            score_thr=s.co_cam_score_thr,
            co_cam_normalise=s.co_cam_normalise,
            seed=ctx.cfg.seed,
            rank=ctx.dist_info.rank,
        )
    ]


register(
    Plugin(
        "mcis",
        MCISSettings,
        "MCIS: co-attention between in-batch image pairs sharing "
        "a class (the sampler pairs the images)",
        build_mcis,
        pair_policy=lambda s: s.pair_policy,
    )
)
