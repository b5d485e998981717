"""PPC: pixel-to-prototype contrast (Du et al., CVPR 2022) as a ToCo plug-in (seeds spec 2).

View S is ToCo's main crop; view T is S resized by `view_scale` (optionally mirrored) and run
through the encoder with grad (one extra pass at scale^2 of the tokens). Everything happens on
T's token grid: S's embeddings and multi-scale CAMs are area-pooled onto it.

Symbols (paper / official code):
    v_i        L2-normalised projected embedding of pixel i (projection head D -> 256 -> 128)
    y^V        per-view pseudo label: argmax over the present classes of the normalised CAM,
               background where the best score <= beta (`bg_thr`); optional ignore band
    p_c^V      prototype of class c in view V: normalise(sum_i m_c(i) v_i) over the top-K
               pixels of the batch by the class score m_c (background score: 1 - max fg score)
    F(v; y; P) = -log( exp(v.p_y / tau) / sum_c exp(v.p_c / tau) )
    L_cp       = (mean_i F(v^S; y^S; P^T) + mean_i F(v^T; y^T; P^S)) / 2   cross-prototype
    L_cc       = (mean_i F(v^S; y^T; P^S) + mean_i F(v^T; y^S; P^T)) / 2   cross-CAM
    L_intra    = (L^S + L^T) / 2 with semi-hard prototype mining (negatives at similarity ranks
               [first, last)) and hard pixel sampling (per class: a random fraction plus the
               ascending-similarity rank window [floor(hi n) - floor((hi - lo) n), floor(hi n)))

Fixes of the official code (seeds spec 2.4): a real background score instead of a constant
channel, prototypes for present classes only (`absent_protos` restores the official negatives),
the positive never counted twice in the semi-hard denominator, the class mean of the hard-pixel
loss taken over classes that were actually sampled, no unused random negatives, vectorised.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from toco.distributed import DistInfo, all_gather_cat
from toco.config import TrainConfig
from toco.errors import ConfigError
from toco.plugins.common import MASKED_LOGIT, ProjectionHead, full_precision, masked_mean, \
    minmax_normalise, step_generator, tokens_in_box
from toco.step import LossModule, StepState

IGNORE = 255


def ppc_pseudo_label(cam: Tensor, cls_label: Tensor, bg_thr: float, valid: Tensor,
                     band: Optional[tuple[float, float]] = None) -> Tensor:
    """Per-view pseudo label y (B, h, w): 0 background, k + 1 class k, IGNORE.

    cam: normalised CAMs (B, K, h, w); cls_label: (B, K) multi-hot; valid: (B, h, w) bool.
    y = argmax_k(cam * label) + 1 where that maximum v > bg_thr, else 0. With `band = (low,
    high)`, pixels with low < v <= high are ignored instead (ToCo's uncertain band).
    """
    v, k = (cam * cls_label[:, :, None, None].to(cam.dtype)).max(dim=1)
    label = torch.where(v > bg_thr, k + 1, torch.zeros_like(k))
    if band is not None:
        label = torch.where((v > band[0]) & (v <= band[1]), torch.full_like(k, IGNORE), label)
    return torch.where(valid, label, torch.full_like(k, IGNORE))


def class_scores(cam: Tensor, cls_label: Tensor, absent_protos: bool = False) -> Tensor:
    """m_c (B, C, h, w) for the prototypes: channel 0 = 1 - max_k(cam * label) (background),
    channel k + 1 = cam_k * label_k (or cam_k itself with `absent_protos`, the official rule)."""
    present = cam * cls_label[:, :, None, None].to(cam.dtype)
    fg = cam if absent_protos else present
    return torch.cat([1 - present.amax(dim=1, keepdim=True), fg], dim=1)


def prototypes(emb: Tensor, scores: Tensor, pixel_ok: Tensor, k: int, class_ok: Tensor
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


def prototype_ce(sim: Tensor, label: Tensor, proto_ok: Tensor, tau: float
                 ) -> tuple[Tensor, Tensor]:
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


def semi_hard_negatives(sim: Tensor, label: Tensor, proto_ok: Tensor, first: int, last: int
                        ) -> Tensor:
    """(M, C) bool: the negatives of each pixel for the intra-view loss.

    All existing prototypes are ranked by descending similarity (the positive included, rank 0 =
    most similar); the prototypes at ranks [first, last) are kept, minus the positive itself.
    """
    s = sim.masked_fill(~proto_ok[None], float("-inf"))
    rank = s.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    classes = torch.arange(sim.shape[1], device=sim.device)
    return ((rank >= first) & (rank < last) & proto_ok[None]
            & (classes[None] != label[:, None]))


def semi_hard_ce(sim: Tensor, label: Tensor, proto_ok: Tensor, tau: float, first: int,
                 last: int) -> tuple[Tensor, Tensor]:
    """-log( exp(s_y / tau) / (exp(s_y / tau) + sum_{n in semi-hard} exp(s_n / tau)) ) per pixel."""
    logits = sim / tau
    keep = semi_hard_negatives(sim, label, proto_ok, first, last)
    safe = label.clamp(0, sim.shape[1] - 1)
    valid = (label != IGNORE) & proto_ok[safe]
    keep = keep | F.one_hot(safe, sim.shape[1]).bool()
    pos = logits.gather(1, safe[:, None]).squeeze(1)
    loss = torch.logsumexp(logits.masked_fill(~keep, MASKED_LOGIT), dim=1) - pos
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


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


def hard_pixel_weights(sim_pos: Tensor, label: Tensor, valid: Tensor, num_classes: int,
                       random_frac: float, lo: float, hi: float,
                       generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """PPC's hard pixel sampling: per class c with n_c >= 2 valid pixels,
    floor(random_frac n_c) pixels drawn uniformly without replacement, plus the pixels at
    ascending-similarity ranks [floor(hi n_c) - floor((hi - lo) n_c), floor(hi n_c)).

    sim_pos: (M,) similarity of each pixel to its own class prototype; label: (M,); valid: (M,).
    Returns (weights (M,) = times each pixel is sampled (0, 1 or 2), group (M,) = its class,
    num_classes for unused pixels). Official values: random_frac 0.5, lo 0.1, hi 0.6.
    """
    group = torch.where(valid, label.clamp(0, num_classes - 1),
                        torch.full_like(label, num_classes))
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


def class_balanced_mean(loss: Tensor, weights: Tensor, group: Tensor, num_classes: int
                        ) -> Tensor:
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
        bg_thr: beta, the background threshold of the pseudo labels.
        ignore_band: (low, high) uncertain band to ignore, or None (official: no band).
        absent_protos: absent classes get prototypes too (negatives only; official).
        proto_scope: 'batch' (this rank) or 'gather' (all ranks' pixels, identical prototypes).
        semi_hard: (first, last) prototype ranks kept as intra-view negatives.
        hard_pixel: (random fraction, lo, hi) of the hard pixel sampling.
        terms: relative weights of (L_cp, L_cc, L_intra); 0 skips the term.
        aux_cam_until_iter: before it, pseudo labels come from the aux CAMs (as ToCo's).
        seed, dist_info: for the per-step random pixel draws and the gather scope.
    """

    names = ("ppc_cp", "ppc_cc", "ppc_intra")

    def __init__(self, embed_dim: int, num_classes: int, weight: float = 0.1,
                 start_iter: int = 0, tau: float = 0.1, proj_dim: int = 128,
                 proj_relu: bool = False, view_scale: float = 0.5, view_flip: bool = False,
                 topk_ratio: float = 0.125, bg_thr: float = 0.5,
                 ignore_band: Optional[tuple[float, float]] = None,
                 absent_protos: bool = False, proto_scope: str = "batch",
                 semi_hard: Sequence[int] = (3, 13),
                 hard_pixel: Sequence[float] = (0.5, 0.1, 0.6),
                 terms: Sequence[float] = (1.0, 1.0, 1.0), aux_cam_until_iter: int = 0,
                 seed: int = 0, dist_info: DistInfo = DistInfo()) -> None:
        super().__init__(weight, start_iter)
        if proto_scope not in ("batch", "gather"):
            raise ConfigError(f"ppc proto_scope must be 'batch' or 'gather', got {proto_scope!r}")
        self.num_classes = num_classes
        self.proj = ProjectionHead(embed_dim, 256, proj_dim, final_relu=proj_relu)
        self.tau = tau
        self.view_scale, self.view_flip = view_scale, view_flip
        self.topk_ratio, self.bg_thr, self.ignore_band = topk_ratio, bg_thr, ignore_band
        self.absent_protos, self.proto_scope = absent_protos, proto_scope
        self.semi_hard = (int(semi_hard[0]), int(semi_hard[1]))
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

    def _prototypes(self, emb: Tensor, cam: Tensor, label: Tensor, cls_label: Tensor,
                    k: int) -> tuple[Tensor, Tensor]:
        """(P, ok) of one view from its embeddings, normalised CAMs and labels."""
        scores = class_scores(cam, cls_label, self.absent_protos)  # (B, C, h, w)
        c = scores.shape[1]
        pix_emb = emb.detach().reshape(-1, emb.shape[-1])
        pix_scores = scores.permute(0, 2, 3, 1).reshape(-1, c)
        pix_ok = (label != IGNORE).reshape(-1)
        present = cls_label > 0
        if self.proto_scope == "gather":
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
            raise ConfigError(f"PPC second view {tuple(images_t.shape[-2:])} has no token; "
                              "raise --ppc-view2-scale or --crop-size")
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
        valid = tokens_in_box(state.img_box, (h, w), grid,
                              (tok_stride(h, images_t.shape[-2], state.model.patch_size),
                               tok_stride(w, images_t.shape[-1], state.model.patch_size)))
        band = self.ignore_band
        lab_s = ppc_pseudo_label(cam_s, y, self.bg_thr, valid, band)
        lab_t = ppc_pseudo_label(cam_t, y, self.bg_thr, valid, band)
        with full_precision(emb_s):
            return self._losses(state, emb_s, emb_t, cam_s, cam_t, lab_s, lab_t, grid)

    def _losses(self, state: StepState, emb_s: Tensor, emb_t: Tensor, cam_s: Tensor,
                cam_t: Tensor, lab_s: Tensor, lab_t: Tensor, grid: tuple[int, int]
                ) -> dict[str, Tensor]:
        """The three terms from both views' embeddings (fp32), CAMs and labels on T's grid."""
        y = state.cls_label
        k = max(1, round(self.topk_ratio * grid[0] * grid[1]))
        p_s, ok_s = self._prototypes(emb_s, cam_s, lab_s, y, k)
        p_t, ok_t = self._prototypes(emb_t, cam_t, lab_t, y, k)

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
            out["ppc_intra"] = w_intra * 0.5 * (
                self._intra(sim_s_ps, l_s, ok_s, gen) + self._intra(sim_t_pt, l_t, ok_t, gen))
        return out

    def _intra(self, sim: Tensor, label: Tensor, proto_ok: Tensor,
               gen: torch.Generator) -> Tensor:
        """L_intra of one view: semi-hard prototypes on hard-sampled pixels."""
        c = sim.shape[1]
        loss, valid = semi_hard_ce(sim, label, proto_ok, self.tau, *self.semi_hard)
        sim_pos = sim.gather(1, label.clamp(0, c - 1)[:, None]).squeeze(1)
        weights, group = hard_pixel_weights(sim_pos, label, valid, c, *self.hard_pixel,
                                            generator=gen)
        return class_balanced_mean(loss, weights, group, c)


def tok_stride(size_s: int, size_t: int, patch: int) -> float:
    """Pixels of view S per token of view T: a T token covers `patch` T pixels, and T is S
    resized from size_s to size_t pixels."""
    return patch * size_s / size_t


def build_ppc(cfg: TrainConfig, embed_dim: int, num_classes: int, dist_info: DistInfo
              ) -> PixelPrototypeContrast:
    """PPC from the config's ppc_* fields."""
    bg_thr = cfg.bkg_thre if cfg.ppc_bg_thr is None else cfg.ppc_bg_thr
    return PixelPrototypeContrast(
        embed_dim, num_classes, weight=cfg.w_ppc, start_iter=cfg.plugin_start,
        tau=cfg.ppc_tau, proj_dim=cfg.ppc_proj_dim, proj_relu=cfg.ppc_proj_relu,
        view_scale=cfg.ppc_view2_scale, view_flip=cfg.ppc_view2_flip,
        topk_ratio=cfg.ppc_topk_ratio, bg_thr=bg_thr,
        ignore_band=(cfg.low_thre, cfg.high_thre) if cfg.ppc_ignore_band else None,
        absent_protos=cfg.ppc_absent_protos, proto_scope=cfg.ppc_proto_scope,
        semi_hard=cfg.ppc_semi_hard, hard_pixel=cfg.ppc_hard_pixel, terms=cfg.ppc_terms,
        aux_cam_until_iter=cfg.aux_cam_until_iter, seed=cfg.seed, dist_info=dist_info)


__all__ = ["PixelPrototypeContrast", "build_ppc", "class_scores", "prototypes",
           "prototype_ce", "semi_hard_negatives", "semi_hard_ce", "hard_pixel_weights",
           "class_balanced_mean", "ppc_pseudo_label", "rank_within_class"]
