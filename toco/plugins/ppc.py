"""PPC: pixel-to-prototype contrast (Du et al., CVPR 2022) as a ToCo plug-in
(design notes: docs/plugins.md).

View S is ToCo's main crop; view T is S resized by `view_scale` (optionally mirrored) and run
through the encoder with grad (one extra pass at scale^2 of the tokens). Everything happens on
T's token grid: S's embeddings and multi-scale CAMs are area-pooled onto it.

Symbols (paper / official code):
    v_i        L2-normalised projected embedding of pixel i (projection head D -> 256 -> 128)
    y^V        per-view pseudo label: argmax over the present classes of the normalised CAM,
               background where the best score <= beta (`bkg_thre`); optional ignore band
    p_c^V      prototype of class c in view V: normalise(sum_i m_c(i) v_i) over the top-K
               pixels of the batch by the class score m_c (background score: 1 - max fg score)
    F(v; y; P) = -log( exp(v.p_y / tau) / sum_c exp(v.p_c / tau) )
    L_cp       = (mean_i F(v^S; y^S; P^T) + mean_i F(v^T; y^T; P^S)) / 2   cross-prototype
    L_cc       = (mean_i F(v^S; y^T; P^S) + mean_i F(v^T; y^S; P^T)) / 2   cross-CAM
    L_intra    = (L^S + L^T) / 2 with semi-hard prototype mining (negatives at similarity ranks
               [first, last)) and hard pixel sampling (per class: a random fraction plus the
               ascending-similarity rank window [floor(hi n) - floor((hi - lo) n), floor(hi n)))

The official window [3, 13) was designed for 21 prototypes (VOC, every class has one). The
default `ema` prototype scope keeps a running prototype of every class seen so far (a persistent
buffer) and uses it for the classes absent from the batch, so the official all-class prototypes
exist after the first few steps, and the window is scaled to the n prototypes that exist:
[max(2, floor(3 n / 21)), max(first + 1, ceil(13 n / 21))), which is [3, 13) at n = 21,
[11, 51) at COCO's 81 and [2, 5) at the synthetic set's 7; the floor 2 (`semi_hard_min_first`)
keeps the hardest negative out of the window at every n, as the official one does (it is at rank
0 or 1). With only the batch's classes (`proto_scope: gather`, 2-6 prototypes) and the floor 0 the
window started at rank 0 and kept the hardest negatives. `semi_hard_window: absolute` gives the
official ranks as they are. The statistic `ppc_hardest_dropped` (logged, not a loss) is the
fraction of the intra-view anchor pixels whose hardest negative the window excludes.

Fixes of the official code (docs/plugins.md): a real background score instead of a constant
channel, prototypes for present classes only (`absent_protos` restores the official negatives),
the positive never counted twice in the semi-hard denominator, the class mean of the hard-pixel
loss taken over classes that were actually sampled, no unused random negatives, vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from toco.distributed import DistInfo, all_gather_cat
from toco.errors import ConfigError
from toco.method.step import LossModule, StepState
from toco.plugins.common import (
    MASKED_LOGIT,
    ProjectionHead,
    masked_mean,
    minmax_normalise,
    step_generator,
    tokens_in_box,
)
from toco.plugins.registry import BuildContext, Plugin, PluginSettings, register, setting
from toco.runtime import full_precision

IGNORE = 255
# The number of prototypes the official semi-hard window [3, 13) was designed for (VOC: 21).
OFFICIAL_PROTOTYPES = 21


def ppc_pseudo_label(
    cam: Tensor,
    cls_label: Tensor,
    bkg_thre: float,
    valid: Tensor,
    band: Optional[tuple[float, float]] = None,
) -> Tensor:
    """Per-view pseudo label y (B, h, w): 0 background, k + 1 class k, IGNORE.

    cam: normalised CAMs (B, K, h, w); cls_label: (B, K) multi-hot; valid: (B, h, w) bool.
    y = argmax_k(cam * label) + 1 where that maximum v > bkg_thre, else 0. With `band = (low,
    high)`, pixels with low < v <= high are ignored instead (ToCo's uncertain band).
    """
    v, k = (cam * cls_label[:, :, None, None].to(cam.dtype)).max(dim=1)
    label = torch.where(v > bkg_thre, k + 1, torch.zeros_like(k))
    if band is not None:
        label = torch.where((v > band[0]) & (v <= band[1]), torch.full_like(k, IGNORE), label)
    return torch.where(valid, label, torch.full_like(k, IGNORE))


def class_scores(cam: Tensor, cls_label: Tensor, absent_protos: bool = False) -> Tensor:
    """m_c (B, C, h, w) for the prototypes: channel 0 = 1 - max_k(cam * label) (background),
    channel k + 1 = cam_k * label_k (or cam_k itself with `absent_protos`, the official rule)."""
    present = cam * cls_label[:, :, None, None].to(cam.dtype)
    fg = cam if absent_protos else present
    return torch.cat([1 - present.amax(dim=1, keepdim=True), fg], dim=1)


def prototypes(
    emb: Tensor, scores: Tensor, pixel_ok: Tensor, k: int, class_ok: Tensor
) -> tuple[Tensor, Tensor]:
    """Prototypes p_c = normalise(sum_{i in topK_c} m_c(i) v_i) over all pixels of the batch.

    emb: (M, d) pixel embeddings (detached by the caller); scores: (M, C) class scores m_c(i);
    pixel_ok: (M,) pixels allowed as prototype evidence; class_ok: (C,) classes that may have a
    prototype. Returns (P (C, d), ok (C,)); a class whose top-K weights sum to 0 has none.
    """
    m = emb.shape[0]
    k = max(1, min(int(k), m))
    s = scores.masked_fill(~pixel_ok[:, None], -1.0).t()  # (C, M)
    top, idx = s.topk(k, dim=1)
    w = top.clamp_min(0)  # (C, K)
    proto = torch.einsum("ck,ckd->cd", w, emb[idx])
    ok = class_ok & (w.sum(dim=1) > 0)
    return F.normalize(proto, dim=1), ok


def prototype_ce(sim: Tensor, label: Tensor, proto_ok: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """F(v; y; P) per pixel: sim (M, C) = v.p_c; label (M,); returns (loss (M,), valid (M,)).

    Only prototypes that exist enter the softmax; pixels labelled IGNORE or with a class that
    has no prototype are not valid (their loss is 0).
    """
    logits = (sim / tau).masked_fill(~proto_ok[None], MASKED_LOGIT)
    safe = label.clamp(0, sim.shape[1] - 1)
    valid = (label != IGNORE) & proto_ok[safe]
    pos = logits.gather(1, safe[:, None]).squeeze(1)
    loss = torch.logsumexp(logits, dim=1) - pos
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def scaled_window(
    first: int,
    last: int,
    num_protos: Tensor,
    reference: int = OFFICIAL_PROTOTYPES,
    min_first: int = 0,
) -> tuple[Tensor, Tensor]:
    """The rank window [first, last) of `reference` prototypes scaled to `num_protos` existing
    ones: [max(min_first, floor(first n / ref)), max(that + 1, ceil(last n / ref))), as 0-dim
    tensors (no host sync). Equal to [first, last) at n = ref (for min_first <= first); never
    empty. `min_first` 2 drops the hardest negative whatever n (ranks 0 and 1 hold it)."""
    n = num_protos.to(torch.float64)
    lo = torch.clamp_min(torch.floor(first * n / reference + 1e-9), float(min_first))
    hi = torch.maximum(lo + 1, torch.ceil(last * n / reference - 1e-9))
    return lo.to(torch.long), hi.to(torch.long)


def semi_hard_negatives(
    sim: Tensor, label: Tensor, proto_ok: Tensor, first: "int | Tensor", last: "int | Tensor"
) -> Tensor:
    """(M, C) bool: the negatives of each pixel for the intra-view loss.

    All existing prototypes are ranked by descending similarity (the positive included, rank 0 =
    most similar); the prototypes at ranks [first, last) are kept, minus the positive itself.
    """
    s = sim.masked_fill(~proto_ok[None], float("-inf"))
    rank = s.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    classes = torch.arange(sim.shape[1], device=sim.device)
    return (rank >= first) & (rank < last) & proto_ok[None] & (classes[None] != label[:, None])


def semi_hard_ce(
    sim: Tensor,
    label: Tensor,
    proto_ok: Tensor,
    tau: float,
    first: "int | Tensor",
    last: "int | Tensor",
    negatives: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """-log( exp(s_y / tau) / (exp(s_y / tau) + sum_{n in semi-hard} exp(s_n / tau)) ) per pixel.

    negatives: `semi_hard_negatives(sim, label, proto_ok, first, last)` when already computed."""
    logits = sim / tau
    keep = (
        semi_hard_negatives(sim, label, proto_ok, first, last) if negatives is None else negatives
    )
    safe = label.clamp(0, sim.shape[1] - 1)
    valid = (label != IGNORE) & proto_ok[safe]
    keep = keep | F.one_hot(safe, sim.shape[1]).bool()
    pos = logits.gather(1, safe[:, None]).squeeze(1)
    loss = torch.logsumexp(logits.masked_fill(~keep, MASKED_LOGIT), dim=1) - pos
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def hardest_negative_excluded(sim: Tensor, label: Tensor, proto_ok: Tensor, keep: Tensor) -> Tensor:
    """(M,) bool: the most similar existing prototype other than the pixel's own class is not
    among its semi-hard negatives `keep` (M, C): the paper's mining drops it as a likely false
    negative. False for a pixel without any negative prototype."""
    own = F.one_hot(label.clamp(0, sim.shape[1] - 1), sim.shape[1]).bool()
    others = proto_ok[None] & ~own
    hardest = sim.masked_fill(~others, float("-inf")).argmax(dim=1)
    return others.any(dim=1) & ~keep.gather(1, hardest[:, None]).squeeze(1)


def _floor(x: Tensor) -> Tensor:
    # Ratios such as 0.6 - 0.1 are not exact in binary; a tiny slack keeps floor(0.5 n) exact.
    return torch.floor(x + 1e-6).to(torch.long)


def rank_within_class(key: Tensor, label: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Ascending rank of each pixel's `key` among the pixels of its class, and the class sizes.

    label: (M,) in [0, num_groups); returns (rank (M,) long, count (num_groups,) long).
    """
    by_key = key.argsort(stable=True)
    order = by_key[label[by_key].argsort(stable=True)]  # by class, then by key
    count = torch.bincount(label, minlength=num_groups)
    start = count.cumsum(0) - count
    rank = torch.empty_like(label)
    rank[order] = torch.arange(label.numel(), device=label.device) - start[label[order]]
    return rank, count


def hard_pixel_weights(
    sim_pos: Tensor,
    label: Tensor,
    valid: Tensor,
    num_classes: int,
    random_frac: float,
    lo: float,
    hi: float,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """PPC's hard pixel sampling: per class c with n_c >= 2 valid pixels,
    floor(random_frac n_c) pixels drawn uniformly without replacement, plus the pixels at
    ascending-similarity ranks [floor(hi n_c) - floor((hi - lo) n_c), floor(hi n_c)).

    sim_pos: (M,) similarity of each pixel to its own class prototype; label: (M,); valid: (M,).
    Returns (weights (M,) = times each pixel is sampled (0, 1 or 2), group (M,) = its class,
    num_classes for unused pixels). Official values: random_frac 0.5, lo 0.1, hi 0.6.
    """
    group = torch.where(valid, label.clamp(0, num_classes - 1), torch.full_like(label, num_classes))
    rank, count = rank_within_class(sim_pos.detach().float(), group, num_classes + 1)
    n = count[group].to(torch.float64)
    hi_rank = _floor(hi * n)
    hard = (rank >= hi_rank - _floor((hi - lo) * n)) & (rank < hi_rank)
    u = torch.rand(label.shape, generator=generator, device=label.device)
    rand_rank, _ = rank_within_class(u, group, num_classes + 1)
    rand = rand_rank < _floor(random_frac * n)
    used = valid & (count[group] >= 2)
    weights = (hard.to(sim_pos.dtype) + rand.to(sim_pos.dtype)) * used.to(sim_pos.dtype)
    return weights, group


def class_balanced_mean(loss: Tensor, weights: Tensor, group: Tensor, num_classes: int) -> Tensor:
    """Mean over classes of the weighted mean loss of each class's sampled pixels; classes
    without a sampled pixel do not count (PPC divides by all classes, a small bias)."""
    w_sum = loss.new_zeros(num_classes + 1).index_add(0, group, weights)
    l_sum = loss.new_zeros(num_classes + 1).index_add(0, group, weights * loss)
    ok = w_sum[:num_classes] > 0
    per_class = l_sum[:num_classes] / w_sum[:num_classes].clamp_min(1e-12)
    return masked_mean(per_class, ok)


class PixelPrototypeContrast(LossModule):
    """PPC on ToCo: L_cp, L_cc and L_intra between the main view and a rescaled second view.

    Returns the three terms as `ppc_cp`, `ppc_cc`, `ppc_intra`, each already multiplied by its
    relative weight from `terms` (the engine then applies `weight`, i.e. --w-ppc).

    Args:
        embed_dim: D of the encoder tokens.
        num_classes: C, background included.
        weight, start_iter: as for every LossModule.
        tau: temperature.
        proj_dim, proj_relu: projection head D -> 256 -> proj_dim (ReLU on the output: official).
        view_scale, view_flip: view T = S resized by view_scale (then mirrored).
        topk_ratio: K = topk_ratio x (tokens of one T image), the prototype's top-K over the batch.
        bkg_thre: beta, the background threshold of the pseudo labels (official 0.2).
        ignore_band: (low, high) uncertain band to ignore, or None (official: no band).
        absent_protos: absent classes get prototypes too (negatives only; official).
        proto_scope: 'batch' (this rank), 'gather' (all ranks' pixels, identical prototypes) or
            'ema' (gather, plus a running prototype of every class seen so far, used for the
            classes absent from the batch; persistent buffers `proto_ema`, `proto_seen`).
        ema_momentum: momentum of the 'ema' prototypes.
        semi_hard: (first, last) prototype ranks kept as intra-view negatives.
        semi_hard_window: 'relative' scales (first, last) from 21 prototypes to the number that
            exist (see `scaled_window`); 'absolute' uses the ranks as given (official).
        semi_hard_min_first: lowest first rank of the relative window (2: the hardest negative
            is never kept).
        hard_pixel: (random fraction, lo, hi) of the hard pixel sampling.
        terms: relative weights of (L_cp, L_cc, L_intra); 0 skips the term.
        aux_cam_until_iter: before it, pseudo labels come from the aux CAMs (as ToCo's).
        seed, dist_info: for the per-step random pixel draws and the gather scope.
    """

    names = ("ppc_cp", "ppc_cc", "ppc_intra", "ppc_hardest_dropped")
    # Fraction of the intra-view anchor pixels whose most similar negative prototype the
    # semi-hard window excludes (the paper's mining is active where this is 1).
    stat_names = ("ppc_hardest_dropped",)

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        weight: float = 0.1,
        start_iter: int = 0,
        tau: float = 0.1,
        proj_dim: int = 128,
        proj_relu: bool = False,
        view_scale: float = 0.5,
        view_flip: bool = False,
        topk_ratio: float = 0.125,
        bkg_thre: float = 0.2,
        ignore_band: Optional[tuple[float, float]] = None,
        absent_protos: bool = False,
        proto_scope: str = "ema",
        ema_momentum: float = 0.9,
        semi_hard: Sequence[int] = (3, 13),
        semi_hard_window: str = "relative",
        semi_hard_min_first: int = 2,
        hard_pixel: Sequence[float] = (0.5, 0.1, 0.6),
        terms: Sequence[float] = (1.0, 1.0, 1.0),
        aux_cam_until_iter: int = 0,
        seed: int = 0,
        dist_info: DistInfo = DistInfo(),
    ) -> None:
        super().__init__(weight, start_iter)
        if proto_scope not in ("batch", "gather", "ema"):
            raise ConfigError(f"ppc proto_scope must be batch, gather or ema, got {proto_scope!r}")
        if semi_hard_window not in ("relative", "absolute"):
            raise ConfigError(
                f"ppc semi_hard_window must be relative or absolute, got {semi_hard_window!r}"
            )
        self.num_classes = num_classes
        self.proj = ProjectionHead(embed_dim, 256, proj_dim, final_relu=proj_relu)
        self.tau = tau
        self.view_scale, self.view_flip = view_scale, view_flip
        self.topk_ratio, self.bkg_thre, self.ignore_band = topk_ratio, bkg_thre, ignore_band
        self.absent_protos, self.proto_scope = absent_protos, proto_scope
        self.semi_hard = (int(semi_hard[0]), int(semi_hard[1]))
        self.semi_hard_window, self.ema_momentum = semi_hard_window, ema_momentum
        self.semi_hard_min_first = int(semi_hard_min_first)
        if proto_scope == "ema":  # only then: checkpoints of the other scopes hold no buffer
            self.register_buffer("proto_ema", torch.zeros(num_classes, proj_dim))
            self.register_buffer("proto_seen", torch.zeros(num_classes, dtype=torch.bool))
        self.hard_pixel = tuple(float(v) for v in hard_pixel)
        self.terms = tuple(float(t) for t in terms)
        self.aux_cam_until_iter = aux_cam_until_iter
        self.seed, self.dist = seed, dist_info

    # ---- per-view tensors ----
    def _embed(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """Projected tokens area-pooled to `size`, L2-normalised: (B, h, w, d)."""
        z = self.proj(tokens).permute(0, 3, 1, 2).float()
        if tuple(z.shape[-2:]) != tuple(size):
            z = F.interpolate(z, size=size, mode="area")
        return F.normalize(z, dim=1).permute(0, 2, 3, 1)

    def _prototypes(
        self, emb: Tensor, cam: Tensor, label: Tensor, cls_label: Tensor, k: int
    ) -> tuple[Tensor, Tensor]:
        """(P, ok) of one view from its embeddings, normalised CAMs and labels."""
        scores = class_scores(cam, cls_label, self.absent_protos)  # (B, C, h, w)
        c = scores.shape[1]
        pix_emb = emb.detach().reshape(-1, emb.shape[-1])
        pix_scores = scores.permute(0, 2, 3, 1).reshape(-1, c)
        pix_ok = (label != IGNORE).reshape(-1)
        present = cls_label > 0
        if self.proto_scope in ("gather", "ema"):
            pix_emb = all_gather_cat(pix_emb.contiguous(), self.dist)
            pix_scores = all_gather_cat(pix_scores.contiguous(), self.dist)
            pix_ok = all_gather_cat(pix_ok, self.dist)
            present = all_gather_cat(present, self.dist)
        class_ok = torch.cat([present.new_ones(1), present.any(dim=0)])
        if self.absent_protos:
            class_ok = torch.ones_like(class_ok)
        return prototypes(pix_emb, pix_scores, pix_ok, k, class_ok)

    def compute(self, state: StepState) -> dict[str, Tensor]:
        if state.model is None:
            raise RuntimeError("PPC needs StepState.model (the second view's encoder pass)")
        use_aux = state.iteration < self.aux_cam_until_iter
        images_t, feats_t = state.rescaled_view(self.view_scale, self.view_flip)
        tok_t = feats_t.aux_tokens if use_aux else feats_t.tokens
        grid = tuple(tok_t.shape[-2:])
        if min(grid) < 1:
            raise ConfigError(
                f"PPC second view {tuple(images_t.shape[-2:])} has no token; "
                "raise --ppc-view2-scale or --crop-size"
            )
        y = state.cls_label
        classifier = state.model.aux_classifier if use_aux else state.model.classifier
        with torch.no_grad():
            cam_t = minmax_normalise(F.relu(classifier.cam(tok_t.detach()).float()))
            cam_s = state.cam_aux if use_aux else state.cam
            cam_s = F.interpolate(cam_s.float(), size=grid, mode="area")
        emb_t = self._embed(feats_t.tokens, grid)
        emb_s = self._embed(state.feats.tokens, grid)
        if self.view_flip:  # back into S's orientation
            emb_t, cam_t = emb_t.flip(2), cam_t.flip(-1)
        h, w = state.images.shape[-2:]
        valid = tokens_in_box(
            state.img_box,
            (h, w),
            grid,
            (
                tok_stride(h, images_t.shape[-2], state.model.patch_size),
                tok_stride(w, images_t.shape[-1], state.model.patch_size),
            ),
        )
        band = self.ignore_band
        lab_s = ppc_pseudo_label(cam_s, y, self.bkg_thre, valid, band)
        lab_t = ppc_pseudo_label(cam_t, y, self.bkg_thre, valid, band)
        with full_precision(emb_s):
            return self._losses(state, emb_s, emb_t, cam_s, cam_t, lab_s, lab_t, grid)

    def _losses(
        self,
        state: StepState,
        emb_s: Tensor,
        emb_t: Tensor,
        cam_s: Tensor,
        cam_t: Tensor,
        lab_s: Tensor,
        lab_t: Tensor,
        grid: tuple[int, int],
    ) -> dict[str, Tensor]:
        """The three terms from both views' embeddings (fp32), CAMs and labels on T's grid."""
        y = state.cls_label
        k = max(1, round(self.topk_ratio * grid[0] * grid[1]))
        p_s, ok_s = self._prototypes(emb_s, cam_s, lab_s, y, k)
        p_t, ok_t = self._prototypes(emb_t, cam_t, lab_t, y, k)
        if self.proto_scope == "ema":
            batch_s, batch_ok_s = p_s, ok_s
            p_s, ok_s = self._with_ema(p_s, ok_s)
            p_t, ok_t = self._with_ema(p_t, ok_t)
            self._update_ema(batch_s, batch_ok_s)

        v_s, v_t = emb_s.reshape(-1, emb_s.shape[-1]), emb_t.reshape(-1, emb_t.shape[-1])
        l_s, l_t = lab_s.reshape(-1), lab_t.reshape(-1)
        w_cp, w_cc, w_intra = self.terms
        out: dict[str, Tensor] = {}
        sim_s_ps, sim_t_pt = v_s @ p_s.t(), v_t @ p_t.t()
        if w_cp > 0:
            sim_s_pt, sim_t_ps = v_s @ p_t.t(), v_t @ p_s.t()
            a = masked_mean(*prototype_ce(sim_s_pt, l_s, ok_t, self.tau))
            b = masked_mean(*prototype_ce(sim_t_ps, l_t, ok_s, self.tau))
            out["ppc_cp"] = w_cp * 0.5 * (a + b)
        if w_cc > 0:
            a = masked_mean(*prototype_ce(sim_s_ps, l_t, ok_s, self.tau))
            b = masked_mean(*prototype_ce(sim_t_pt, l_s, ok_t, self.tau))
            out["ppc_cc"] = w_cc * 0.5 * (a + b)
        if w_intra > 0:
            gen = step_generator(v_s.device, self.seed, state.iteration, self.dist.rank, 0x505043)
            intra_s, dropped_s = self._intra(sim_s_ps, l_s, ok_s, gen)
            intra_t, dropped_t = self._intra(sim_t_pt, l_t, ok_t, gen)
            out["ppc_intra"] = w_intra * 0.5 * (intra_s + intra_t)
            out["ppc_hardest_dropped"] = 0.5 * (dropped_s + dropped_t)
        return out

    def _with_ema(self, protos: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        """The batch prototypes, with the running ones for seen classes the batch lacks."""
        fallback = self.proto_seen & ~ok
        return (
            torch.where(fallback[:, None], self.proto_ema.to(protos.dtype), protos),
            ok | self.proto_seen,
        )

    @torch.no_grad()
    def _update_ema(self, protos: Tensor, ok: Tensor) -> None:
        """p_ema <- normalise(m p_ema + (1 - m) p) for the classes of the batch (first sight:
        p). The prototypes come from every rank's pixels, so the update is rank-identical."""
        m = self.ema_momentum
        blend = F.normalize(m * self.proto_ema + (1 - m) * protos.detach().float(), dim=1)
        new = torch.where(self.proto_seen[:, None], blend, protos.detach().float())
        self.proto_ema.copy_(torch.where(ok[:, None], new, self.proto_ema))
        self.proto_seen.copy_(self.proto_seen | ok)

    def _window(self, proto_ok: Tensor) -> "tuple[int | Tensor, int | Tensor]":
        if self.semi_hard_window == "absolute":
            return self.semi_hard
        return scaled_window(*self.semi_hard, proto_ok.sum(), min_first=self.semi_hard_min_first)

    def _intra(
        self, sim: Tensor, label: Tensor, proto_ok: Tensor, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """L_intra of one view (semi-hard prototypes on hard-sampled pixels) and the fraction
        of its sampled pixels whose hardest negative the window drops (the mining statistic)."""
        c = sim.shape[1]
        first, last = self._window(proto_ok)
        keep = semi_hard_negatives(sim, label, proto_ok, first, last)
        loss, valid = semi_hard_ce(sim, label, proto_ok, self.tau, first, last, negatives=keep)
        sim_pos = sim.gather(1, label.clamp(0, c - 1)[:, None]).squeeze(1)
        weights, group = hard_pixel_weights(
            sim_pos, label, valid, c, *self.hard_pixel, generator=gen
        )
        with torch.no_grad():
            dropped = masked_mean(
                hardest_negative_excluded(sim, label, proto_ok, keep).float(), weights > 0
            )
        return class_balanced_mean(loss, weights, group, c), dropped


def tok_stride(size_s: int, size_t: int, patch: int) -> float:
    """Pixels of view S per token of view T: a T token covers `patch` T pixels, and T is S
    resized from size_s to size_t pixels."""
    return patch * size_s / size_t


@dataclass
class PPCSettings(PluginSettings):
    """PPC's settings (YAML section `plugins: {ppc: ...}`, flags `--ppc-*`)."""

    # `before=`: what stored configs that predate a setting did. Checkpoints from before the
    # relative window used the official ranks; those from before `semi_hard_min_first` let
    # the window start at 0.
    weight: float = setting(0.1, "weight of the PPC losses")
    tau: float = setting(0.1, "temperature")
    proj_dim: int = setting(128, "projection width")
    proj_relu: bool = setting(False, "ReLU after the projection (official code)")
    view2_scale: float = setting(0.5, "second view: the main view resized by this")
    view2_flip: bool = setting(False, "second view is also mirrored")
    topk_ratio: float = setting(
        0.125,
        "prototype: top-K pixels per class over the batch, "
        "K = ratio x tokens of one second-view image",
    )
    bkg_thre: Optional[float] = setting(
        0.2,
        "label: foreground where the best present-class "
        "CAM score exceeds this (official SEAM branch: 0.2, "
        "EPS: 0.1; none: ToCo's bkg_thre)",
        renamed_from=("bg_thr",),
    )
    ignore_band: bool = setting(False, "label: scores in (low_thre, high_thre] are ignored")
    absent_protos: bool = setting(
        False, "prototypes of classes absent from the batch serve as negatives (official code)"
    )
    proto_scope: str = setting(
        "ema",
        "prototypes from this rank's batch, from all ranks' "
        "(gather; = batch on one process), or gather plus running "
        "prototypes of every class seen (ema: the official all-class "
        "prototypes, so the semi-hard ranks exist)",
        ["batch", "gather", "ema"],
    )
    ema_momentum: float = setting(0.9, "momentum of the running prototypes (proto_scope ema)")
    semi_hard: tuple = setting(
        (3, 13),
        "semi-hard negatives: prototype similarity ranks "
        "[first, last) (0-based; official: 3 13 of 21)",
        elem=int,
    )
    semi_hard_window: str = setting(
        "relative",
        "relative: the ranks scaled from 21 prototypes "
        "to the number that exist; absolute: as given (official)",
        ["relative", "absolute"],
        before="absolute",
    )
    semi_hard_min_first: int = setting(
        2,
        "relative window: its first rank is at least this (2 "
        "drops the hardest negative as the official window does; "
        "0: the window may start at rank 0)",
        before=0,
    )
    hard_pixel: tuple = setting(
        (0.5, 0.1, 0.6),
        "hard pixels per class: random fraction, and "
        "the ascending-similarity rank window (lo, hi] as fractions",
        elem=float,
    )
    terms: tuple = setting(
        (1.0, 1.0, 1.0),
        "relative weights of the cross-prototype, cross-CAM and intra-view terms (0 skips a term)",
        elem=float,
    )

    def check(self, cfg, need, key) -> None:
        for name in ("tau", "proj_dim"):
            need(
                getattr(self, name) > 0, f"{key(name)} must be positive, got {getattr(self, name)}"
            )
        need(
            0 < self.view2_scale <= 1,
            f"{key('view2_scale')} must be in (0, 1], got {self.view2_scale}",
        )
        need(
            cfg.crop_size * self.view2_scale >= 32,
            f"{key('view2_scale')} {self.view2_scale} x crop_size {cfg.crop_size} leaves the "
            "PPC second view under 32 px (fewer than 2x2 tokens)",
        )
        need(
            0 < self.topk_ratio <= 1,
            f"{key('topk_ratio')} must be in (0, 1], got {self.topk_ratio}",
        )
        need(
            self.bkg_thre is None or 0 <= self.bkg_thre <= 1,
            f"{key('bkg_thre')} must be in [0, 1], got {self.bkg_thre}",
        )
        need(
            0 <= self.ema_momentum < 1,
            f"{key('ema_momentum')} must be in [0, 1), got {self.ema_momentum}",
        )
        need(
            len(self.semi_hard) == 2 and 0 <= self.semi_hard[0] < self.semi_hard[1],
            f"{key('semi_hard')} must be two ranks 0 <= first < last, got {self.semi_hard}",
        )
        need(
            self.semi_hard_min_first >= 0,
            f"{key('semi_hard_min_first')} must be >= 0, got {self.semi_hard_min_first}",
        )
        need(
            len(self.hard_pixel) == 3
            and 0 <= self.hard_pixel[0] <= 1
            and 0 <= self.hard_pixel[1] <= self.hard_pixel[2] <= 1,
            f"{key('hard_pixel')} must be (random fraction in [0, 1], lo, hi) with "
            f"0 <= lo <= hi <= 1, got {self.hard_pixel}",
        )
        need(
            len(self.terms) == 3 and all(t >= 0 for t in self.terms),
            f"{key('terms')} must be three weights >= 0, got {self.terms}",
        )
        need(
            any(t > 0 for t in self.terms),
            f"PPC with every {key('terms')} weight 0 computes nothing; switch it off instead",
        )


def build_ppc(settings: PPCSettings, ctx: BuildContext) -> list[LossModule]:
    """PPC's loss module from its settings (and the core thresholds and seed)."""
    cfg, s = ctx.cfg, settings
    return [
        PixelPrototypeContrast(
            ctx.embed_dim,
            ctx.num_classes,
            weight=s.weight,
            start_iter=s.start(cfg),
            tau=s.tau,
            proj_dim=s.proj_dim,
            proj_relu=s.proj_relu,
            view_scale=s.view2_scale,
            view_flip=s.view2_flip,
            topk_ratio=s.topk_ratio,
            bkg_thre=cfg.bkg_thre if s.bkg_thre is None else s.bkg_thre,
            ignore_band=(cfg.low_thre, cfg.high_thre) if s.ignore_band else None,
            absent_protos=s.absent_protos,
            proto_scope=s.proto_scope,
            ema_momentum=s.ema_momentum,
            semi_hard=s.semi_hard,
            semi_hard_window=s.semi_hard_window,
            semi_hard_min_first=s.semi_hard_min_first,
            hard_pixel=s.hard_pixel,
            terms=s.terms,
            aux_cam_until_iter=cfg.aux_cam_until_iter,
            seed=cfg.seed,
            dist_info=ctx.dist_info,
        )
    ]


register(
    Plugin(
        "ppc",
        PPCSettings,
        "PPC: pixel-to-prototype contrast between the main view "
        "and a rescaled second view (training only)",
        build_ppc,
    )
)

__all__ = [
    "PixelPrototypeContrast",
    "PPCSettings",
    "build_ppc",
    "scaled_window",
    "class_scores",
    "prototypes",
    "prototype_ce",
    "semi_hard_negatives",
    "semi_hard_ce",
    "hard_pixel_weights",
    "class_balanced_mean",
    "hardest_negative_excluded",
    "ppc_pseudo_label",
    "rank_within_class",
]
