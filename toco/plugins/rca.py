"""RCA: regional semantic contrast and aggregation (Zhou et al., CVPR 2022) as a ToCo plug-in
(design notes: docs/plugins.md).

Pieces:
- `RCAMemory`: the class-wise regional memory M_k (K classes x L slots x d), its write pointer
  and fill count, and the k-means centroids U_k. All are persistent buffers.
- `RCAAggregation`: a feature hook of the network (`model.feature_hooks`): every encoder pass
  (training, the CAM passes, inference) maps the final tokens X to X' = W_f [X; O] (official
  concat + 1x1 fusion, initialised to the identity), O = Out(softmax(Q(X) K(U)^T / sqrt(d))
  V(U)); the identity until the first centroids exist. The trained model carries the memory
  centroids in its state_dict.
- `RCACoarseHead`: the official coarse pre-aggregation head A0 = W_0 X, loss 0.4 MLSM(GAP(A0),
  y) from iteration 0; its CAM gives the region masks (softmax over classes above its spatial
  mean).
- `RegionalContrast`: the loss module. Region embeddings r_{b,c} = normalise(mean of g(X) over the
  region of class c in image b) (g: projection head D -> 512 -> d, on the tokens *before*
  aggregation); FIFO enqueue of regions whose sigmoid(GAP of the final CAM) > 0.7, all-gathered
  across ranks; region-to-memory InfoNCE with every filled slot of the class as a positive
  (tau 0.07), embedding mixup with every query (partner: a random class of the image a random
  permutation pairs with, lambda ~ Beta(8, 8)); a deterministic k-means refresh of U every
  `kmeans_every` iterations.

When the memory is written: from the plug-in's start iteration on, the same iteration the
contrast starts, and the contrast of a step is taken against the memory *after* that step's
write. So the projection g is trained from the very first entry on (the first batch's regions
are each other's positives and negatives), and no slot or centroid is ever computed in an
untrained projection that drifts once training starts. (Filling the memory during ToCo's warm-up
in a random g, as before, meant the contrast began against a memory of stale embeddings.) With
the contrast off (aggregation only) g is never trained: the memory then lives in a fixed random
projection of the tokens.

Where the aggregation is inserted (`aggregation_insert`): 'all' rewrites the final tokens of
every encoder pass (classifier, CAMs, PTC, decoder); 'decoder' only the decoder's input (the CAMs
and pseudo labels are then those of plain ToCo).

Fixes of the official code (docs/plugins.md), each with the official behaviour one flag away:
- random-noise slots: the memory starts empty and only filled slots are used
  (`noise_init=True`: N(0, 1) slots that count as filled, the official start);
- slot update: plain FIFO overwrite (`update='ema'`: 0.99 blend into the slot, official);
- multi-label masking: every class is pooled under its own mask (`cumulative_mask=True`: the
  official in-place masking, class k pooled under the product of the earlier classes' masks);
- attention: softmax over the centroids (`attention='dot'`: the official S = 2 Q K^T, unnormalised);
- fusion initialised to the identity (official: random N(0, 0.01)) and skipped before the first
  centroids (`fusion='gate'`: the earlier gated residual);
- one embedding space for queries and memory (the official code stores raw backbone features
  but queries in the projected space): not reachable, the mismatch has no use;
- DataParallel buffer loss: the enqueue is all-gathered, so the memory is identical on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone import EncoderOutput
from toco.distributed import DistInfo, all_gather_cat
from toco.errors import ConfigError
from toco.method.losses import multilabel_loss
from toco.method.step import LossModule, StepState
from toco.plugins.common import (
    MASKED_LOGIT,
    ProjectionHead,
    masked_mean,
    step_generator,
    step_seed,
)
from toco.plugins.registry import BuildContext, Plugin, PluginSettings, register, setting
from toco.runtime import full_precision


class RCAMemory(nn.Module):
    """Class-wise FIFO memory of region embeddings and its k-means centroids.

    Buffers (all persistent): `mem` (K, L, d), `ptr` (K,) next slot to write, `count` (K,) filled
    slots (slots 0..count-1 are filled: FIFO fills them in order before wrapping), `cent`
    (K, k, d) centroids U and `cent_ok` (K,) classes whose centroids exist.

    Args:
        num_fg_classes: K = C - 1.
        size: L slots per class.
        dim: d.
        num_centroids: k per class.
        noise_init: start from N(0, 1) slots and centroids that count as filled (official code).
    """

    def __init__(
        self, num_fg_classes: int, size: int, dim: int, num_centroids: int, noise_init: bool = False
    ) -> None:
        super().__init__()
        self.size, self.dim, self.num_centroids = size, dim, num_centroids
        k = num_fg_classes
        if noise_init:
            mem, cent = torch.randn(k, size, dim), torch.randn(k, num_centroids, dim)
        else:
            mem, cent = torch.zeros(k, size, dim), torch.zeros(k, num_centroids, dim)
        self.register_buffer("mem", mem)
        self.register_buffer("ptr", torch.zeros(k, dtype=torch.long))
        self.register_buffer("count", torch.full((k,), size if noise_init else 0, dtype=torch.long))
        self.register_buffer("cent", cent)
        self.register_buffer("cent_ok", torch.full((k,), noise_init, dtype=torch.bool))

    @property
    def num_classes(self) -> int:
        return self.mem.shape[0]

    def filled(self) -> Tensor:
        """(K, L) bool: slots holding an entry."""
        slots = torch.arange(self.size, device=self.count.device)
        return slots[None] < self.count[:, None]

    @torch.no_grad()
    def enqueue(
        self, emb: Tensor, ok: Tensor, update: str = "fifo", momentum: float = 0.99
    ) -> None:
        """Write the entries emb[e, k] with ok[e, k] into class k's queue, in order of e.

        emb: (E, K, d); ok: (E, K) bool. FIFO: entry j of class k (j-th true of ok[:, k]) goes to
        slot (ptr_k + j) mod L; if more than L arrive only the last L are kept (the earlier ones
        would be overwritten anyway). 'ema' blends into a filled slot, M <- m M + (1 - m) e,
        as the official code does; an empty slot takes e. No host synchronisation.
        """
        k, size = self.num_classes, self.size
        ok = ok.to(torch.bool)
        n_new = ok.sum(dim=0)  # (K,)
        order = ok.long().cumsum(dim=0) - 1  # j of each entry within its class
        if emb.shape[0] <= size:
            self._enqueue_rows(emb, ok, n_new, order, update, momentum)
            return
        keep = ok & (order >= (n_new - size)[None])
        slot = (self.ptr[None] + order) % size  # (E, K)
        entry = torch.arange(1, emb.shape[0] + 1, device=emb.device)[:, None].expand_as(slot)
        src = torch.zeros(k, size, dtype=torch.long, device=emb.device)
        src.scatter_reduce_(1, slot.t(), torch.where(keep, entry, 0).t(), reduce="amax")
        written = src > 0  # (K, L); src - 1 = the entry written there
        index = (src - 1).clamp_min(0)[..., None].expand(k, size, emb.shape[-1])
        new = emb.to(self.mem.dtype).transpose(0, 1).gather(1, index)  # (K, L, d)
        if update == "ema":
            new = torch.where(
                self.filled()[..., None], momentum * self.mem + (1 - momentum) * new, new
            )
        self.mem.copy_(torch.where(written[..., None], new, self.mem))
        self.ptr.copy_((self.ptr + n_new) % size)
        self.count.copy_((self.count + n_new).clamp_max(size))

    def _enqueue_rows(
        self, emb: Tensor, ok: Tensor, n_new: Tensor, order: Tensor, update: str, momentum: float
    ) -> None:
        """`enqueue` touching only E x K rows (E <= L): entry e of class k writes slot
        (ptr_k + j) mod L if it is the j-th new entry of k; the other entries rewrite the slots
        right after those with their own contents, so all E x K indices are distinct (a
        deterministic index_copy_) and the result equals the sequential FIFO."""
        k, size, d = self.num_classes, self.size, self.dim
        skipped = (~ok).long().cumsum(dim=0) - 1
        offset = torch.where(ok, order, n_new[None] + skipped)  # (E, K), distinct per class
        slot = (self.ptr[None] + offset) % size
        flat = (torch.arange(k, device=emb.device)[None] * size + slot).reshape(-1)
        table = self.mem.view(k * size, d)
        old = table.index_select(0, flat).view(*slot.shape, d)
        new = emb.to(self.mem.dtype)
        if update == "ema":
            was_filled = (slot < self.count[None])[..., None]
            new = torch.where(was_filled, momentum * old + (1 - momentum) * new, new)
        table.index_copy_(0, flat, torch.where(ok[..., None], new, old).reshape(-1, d))
        self.ptr.copy_((self.ptr + n_new) % size)
        self.count.copy_((self.count + n_new).clamp_max(size))

    @torch.no_grad()
    def refresh_centroids(self, iters: int = 10, seed: int = 0) -> None:
        """k-means (Lloyd, Euclidean) on the normalised filled slots of every class at once.

        Deterministic given the memory and `seed`: the k initial centres are filled slots drawn
        without replacement by a seeded generator on the memory's device, so every rank that
        holds the same memory gets the same centroids. A class with fewer filled slots than k
        uses their mean, repeated; a class with none has no centroids (cent_ok False).
        """
        k_cls, size, k = self.num_classes, self.size, self.num_centroids
        x = F.normalize(self.mem.float(), dim=-1)  # (K, L, d)
        filled = self.filled()
        gen = torch.Generator(device=x.device)
        gen.manual_seed(seed % (2**63 - 1))
        keys = torch.rand(k_cls, size, generator=gen, device=x.device).masked_fill(~filled, -1.0)
        init = keys.topk(k, dim=1).indices  # (K, k): distinct slots, filled ones first
        cent = x.gather(1, init[..., None].expand(k_cls, k, x.shape[-1]))
        w = filled.to(x.dtype)
        for _ in range(iters):
            d2 = cent.square().sum(-1)[:, None, :] - 2 * x @ cent.transpose(1, 2)  # (K, L, k)
            assign = F.one_hot(d2.argmin(dim=-1), k).to(x.dtype) * w[..., None]
            mass = assign.sum(dim=1)  # (K, k)
            sums = assign.transpose(1, 2) @ x  # (K, k, d)
            cent = torch.where(mass[..., None] > 0, sums / mass.clamp_min(1)[..., None], cent)
        mean = (x * w[..., None]).sum(1) / w.sum(1).clamp_min(1)[:, None]
        few = (self.count < k)[:, None, None]
        cent = torch.where(few, mean[:, None].expand_as(cent), cent)
        self.cent.copy_(cent.to(self.cent.dtype))
        self.cent_ok.copy_(self.count > 0)


class AggregatedOutput(EncoderOutput):
    """An EncoderOutput whose `raw_tokens` attribute keeps the final tokens before aggregation
    (RCA's contrast queries come from X, not from X')."""


class RCAAggregation(nn.Module):
    """Semantic aggregation over the memory centroids U, as a network feature hook.

    O = W_o (A V(U)) with A = softmax_j(Q(X) . K(U_j) / sqrt(d)) over the C-1 x k existing
    centroids ('softmax'), or A = 2 Q(X) K(U)^T unnormalised ('dot', official). Fusion:
    'concat' (official): X' = W_f [X; O] + b_f, a 1x1 map 2D -> D initialised to [I, 0] so that
    X' = X when the centroids first appear (official init: random, which would discard a
    pretrained encoder's features); before any centroid exists the block is the identity.
    'gate': X' = X + gamma O, gamma a zero-initialised scalar (the earlier port; it adds W_o's
    bias once gamma moves, centroids or not).

    Args:
        embed_dim: D.
        memory: the RCAMemory whose centroids are read (shared with the loss module).
        attention: 'softmax' or 'dot'.
        fusion: 'concat' or 'gate'.
    """

    def __init__(
        self, embed_dim: int, memory: RCAMemory, attention: str = "softmax", fusion: str = "concat"
    ) -> None:
        super().__init__()
        if attention not in ("softmax", "dot"):
            raise ConfigError(f"rca attention must be 'softmax' or 'dot', got {attention!r}")
        if fusion not in ("concat", "gate"):
            raise ConfigError(f"rca fusion must be 'concat' or 'gate', got {fusion!r}")
        d = memory.dim
        self.memory = memory
        self.attention, self.fusion = attention, fusion
        self.q = nn.Linear(embed_dim, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, embed_dim)
        if fusion == "gate":
            self.gate = nn.Parameter(torch.zeros(()))
        else:
            self.fuse = nn.Linear(2 * embed_dim, embed_dim)
            with torch.no_grad():
                self.fuse.weight.zero_()
                self.fuse.weight[:, :embed_dim].copy_(torch.eye(embed_dim))
                self.fuse.bias.zero_()

    def aggregate(self, tokens: Tensor) -> Tensor:
        """The aggregated context W_o (A V(U)) for tokens (B, D, h, w), as (B, D, h, w)."""
        b, _, h, w = tokens.shape
        x = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
        mem = self.memory
        # Copies: the loss module refreshes the buffers in place while this graph is alive.
        u = mem.cent.detach().reshape(-1, mem.dim).to(x.dtype, copy=True)  # (K k, d)
        ok = mem.cent_ok.repeat_interleave(mem.num_centroids)  # (K k,)
        # Q(X) K(U)^T and Out(A V(U)) with the linear maps folded into the M = (C-1) k centroids
        # first: (x W_q^T + b_q) K^T = x (W_q^T K^T) + b_q K^T and Out(A V) = A (V W_o^T) + b_o.
        # Same values, but per token D x M products instead of D x d ones (2-3x fewer FLOPs in
        # every encoder pass, the multi-scale CAM passes included).
        key = self.k(u)  # (M, d)
        logits = x @ (self.q.weight.t() @ key.t()) + key @ self.q.bias  # (B, N, M)
        values = self.v(u) @ self.out.weight.t()  # (M, D)
        if self.attention == "softmax":
            # Missing centroids get the lowest finite logit and are zeroed after the softmax
            # (with -inf a class-less memory would give NaN rows, and NaN gradients).
            logits = (logits / math.sqrt(mem.dim)).float()
            logits = logits.masked_fill(~ok, torch.finfo(logits.dtype).min)
            attn = (logits.softmax(dim=-1) * ok).to(values.dtype)
        else:
            attn = 2.0 * logits * ok.to(logits.dtype)
        ctx = attn @ values + self.out.bias  # (B, N, D)
        return ctx.transpose(1, 2).reshape(b, -1, h, w)

    def rewrite(self, tokens: Tensor) -> Tensor:
        """X' for tokens (B, D, h, w) (see the class docstring)."""
        if self.fusion == "gate":
            return tokens + self.gate.to(tokens.dtype) * self.aggregate(tokens)
        joint = torch.cat([tokens, self.aggregate(tokens)], dim=1).permute(0, 2, 3, 1)
        fused = self.fuse(joint).permute(0, 3, 1, 2)
        # No centroid yet: the identity (a 0-dim condition, no host sync).
        return torch.where(self.memory.cent_ok.any(), fused, tokens)

    def forward(self, feats: EncoderOutput) -> EncoderOutput:
        out = AggregatedOutput(feats.cls, self.rewrite(feats.tokens), feats.aux_tokens)
        out.raw_tokens = getattr(feats, "raw_tokens", feats.tokens)
        return out


class AggregatedDecoder(nn.Module):
    """The decoder with the aggregation on its input only (`aggregation_insert: decoder`)."""

    def __init__(self, aggregation: RCAAggregation, decoder: nn.Module) -> None:
        super().__init__()
        self.aggregation = aggregation
        self.decoder = decoder

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(self.aggregation.rewrite(tokens))


def region_masks(
    source: str,
    state: StepState,
    grid: tuple[int, int],
    high_thre: float,
    aux_cam_until_iter: int = 0,
) -> Tensor:
    """(B, K, h, w) float {0, 1} region masks of every class on the token grid (labels not
    applied, except through the pseudo labels).

    'pseudo_label': ToCo's token pseudo labels == k + 1 (reliable foreground; uncertain and
    padded tokens are excluded); 'cam_thr': the multi-scale CAM area-pooled to the grid >
    high_thre; 'cam_mean': P = softmax over classes of the online CAM, P_k > mean_p P_k (official).
    """
    k = state.cls_label.shape[1]
    if source == "pseudo_label":
        label = state.token_label
        classes = torch.arange(1, k + 1, device=label.device)
        return (label[:, None] == classes[None, :, None, None]).float()
    if source == "cam_thr":
        cam = state.cam_aux if state.iteration < aux_cam_until_iter else state.cam
        return (F.interpolate(cam.float(), size=grid, mode="area") > high_thre).float()
    if source == "cam_mean":
        if state.model is None:
            raise RuntimeError("rca mask_source 'cam_mean' needs StepState.model")
        with torch.no_grad():
            return above_spatial_mean(state.model.classifier.cam(state.feats.tokens.detach()))
    if source == "coarse_mean":
        if COARSE_CAM not in state.extras:
            raise RuntimeError(
                "rca mask_source 'coarse_mean' needs the coarse head's CAM "
                "(RCACoarseHead runs before RegionalContrast)"
            )
        return above_spatial_mean(state.extras[COARSE_CAM])
    raise ConfigError(f"unknown rca mask source {source!r}")


def above_spatial_mean(cam: Tensor) -> Tensor:
    """RCA's region masks: P = softmax over the classes of a raw CAM (B, K, h, w); the mask of
    class k is P_k > mean over the positions of P_k. Float {0, 1}."""
    p = cam.float().softmax(dim=1)
    return (p > p.mean(dim=(-2, -1), keepdim=True)).float()


# StepState.extras key of the coarse head's raw CAM (detached), read by the region masks.
COARSE_CAM = "rca_coarse_cam"


class RCACoarseHead(LossModule):
    """RCA's coarse (pre-aggregation) head: a bias-free 1x1 classifier D -> C-1 on the final
    tokens *before* the aggregation, A0 = W_0 X. Its loss `rca_coarse` = MLSM(pool(A0), y)
    (pool GAP, official; or GMP, ToCo's classifier pooling) at weight 0.4 from iteration 0
    (the official classification phase); its detached CAM gives the region masks of the memory
    and the contrast (`mask_source: coarse_mean`). Training only: inference never reads it.

    Args:
        embed_dim, num_classes: D and C (background included).
        weight: the loss weight (official 0.4); the head still runs at 0 (the masks need it).
        pool: 'gap' or 'gmp'.
    """

    names = ("rca_coarse",)

    def __init__(
        self, embed_dim: int, num_classes: int, weight: float = 0.4, pool: str = "gap"
    ) -> None:
        super().__init__(weight, 0)
        if pool not in ("gap", "gmp"):
            raise ConfigError(f"rca coarse_pool must be 'gap' or 'gmp', got {pool!r}")
        self.classifier = nn.Conv2d(embed_dim, num_classes - 1, kernel_size=1, bias=False)
        self.pool = pool

    def active(self, iteration: int) -> bool:  # the masks need A0 even at weight 0
        return True

    def compute(self, state: StepState) -> dict[str, Tensor]:
        raw = getattr(state.feats, "raw_tokens", state.feats.tokens)
        cam = self.classifier(raw)
        state.extras[COARSE_CAM] = cam.detach()
        pooled = cam.mean(dim=(-2, -1)) if self.pool == "gap" else cam.amax(dim=(-2, -1))
        return {"rca_coarse": multilabel_loss(pooled.float(), state.cls_label)}


def contrast_per_query(
    q: Tensor, targets: Sequence[Tensor], mem: Tensor, filled: Tensor, tau: float
) -> list[Tensor]:
    """RCA's multi-positive InfoNCE of queries against the memory, per query and target.

    q: (R, d) normalised; each target: (R,) class index; mem: (K, L, d); filled: (K, L).
    With s_j = q . m_j / tau over the normalised filled slots:
        L(q, t) = mean_{j in M_t} [ -s_j + log(exp(s_j) + sum_{n not in M_t} exp(s_n)) ].
    A class without filled slots gives 0. The similarities are computed once for all targets
    (the mixup loss needs two per query).
    """
    kcls, size, d = mem.shape
    m = F.normalize(mem.float(), dim=-1).reshape(kcls * size, d)
    s = ((q.float() @ m.t()) / tau).reshape(-1, kcls, size)  # (R, K, L)
    ok = filled.reshape(kcls, size)
    # log sum_{j in M_k} exp(s_j) per class (a class without entries: ~MASKED_LOGIT)
    class_lse = torch.logsumexp(s.masked_fill(~ok[None], MASKED_LOGIT), dim=2)  # (R, K)
    out = []
    for target in targets:
        same = torch.arange(kcls, device=q.device)[None] == target[:, None]  # (R, K)
        neg_lse = torch.logsumexp(class_lse.masked_fill(same, MASKED_LOGIT), dim=1)
        s_t = s.gather(1, target[:, None, None].expand(-1, 1, size)).squeeze(1)  # (R, L)
        pos = ok[target]  # (R, L)
        per = torch.logaddexp(s_t, neg_lse[:, None]) - s_t
        per = torch.where(pos, per, torch.zeros_like(per))
        out.append(per.sum(dim=1) / pos.sum(dim=1).clamp_min(1))
    return out


class RegionalContrast(LossModule):
    """RCA's loss module: region contrast against the memory, enqueue and centroid refresh.

    From `start_iter` on, every step writes the memory and then (with `contrast`) returns the
    contrast loss (`rca`) against the memory including that write, for classes whose queue is
    at least `min_fill` full (default 0: from the first entry, so g gets gradient from the
    first write). The module's `memory` is the same RCAMemory the network's RCAAggregation
    reads (when aggregation is on), so both state_dicts hold it. The enqueue happens inside
    `compute`, so a step that `--nonfinite skip` drops has still written the memory.

    Args:
        embed_dim, num_classes: D and C (background included).
        memory: the shared RCAMemory.
        weight: the plug-in weight (1.0 when the contrast is off: nothing is returned then).
        start_iter: first iteration of the memory writes and the contrast.
        contrast: return the contrast loss (False: the memory only feeds the aggregation).
        dim: d of the projection g.
        tau: temperature.
        mask_source: see `region_masks`.
        high_thre: CAM threshold of the 'cam_thr' masks.
        enqueue_thr: regions are enqueued when sigmoid(image score) > this.
        enqueue_score: the image score: 'cam_gap' (GAP of the final CAM, official) or
            'logits' (ToCo's max-pooled logits).
        min_tokens: regions with fewer tokens are skipped.
        min_fill: fraction of L a class needs before it is used by the contrast.
        update, momentum: memory write rule ('fifo' or 'ema').
        cumulative_mask: official multi-label masking bug in the enqueue.
        kmeans_every, kmeans_iters: centroid refresh period and Lloyd steps.
        mixup_p, mixup_alpha: probability of mixing a query with another region, Beta(a, a)
            (official: always, a = 8).
        mixup_partner: see `mixup_plan`.
        aux_cam_until_iter: as ToCo's, for the 'cam_thr' masks.
        seed, dist_info: per-step randomness and the enqueue all-gather.
    """

    names = ("rca",)

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        memory: RCAMemory,
        weight: float = 0.1,
        start_iter: int = 0,
        contrast: bool = True,
        dim: int = 256,
        tau: float = 0.07,
        mask_source: str = "coarse_mean",
        high_thre: float = 0.7,
        enqueue_thr: float = 0.7,
        min_tokens: int = 4,
        min_fill: float = 0.0,
        update: str = "fifo",
        momentum: float = 0.99,
        cumulative_mask: bool = False,
        kmeans_every: int = 500,
        kmeans_iters: int = 10,
        mixup_p: float = 1.0,
        mixup_alpha: float = 8.0,
        mixup_partner: str = "image",
        enqueue_score: str = "cam_gap",
        aux_cam_until_iter: int = 0,
        seed: int = 0,
        dist_info: DistInfo = DistInfo(),
    ) -> None:
        super().__init__(weight, start_iter)
        if update not in ("fifo", "ema"):
            raise ConfigError(f"rca update must be 'fifo' or 'ema', got {update!r}")
        if memory.dim != dim or memory.num_classes != num_classes - 1:
            raise ConfigError("RCA memory shape does not match the plug-in's dim/classes")
        self.memory = memory
        self.proj = ProjectionHead(embed_dim, 512, dim)
        self.contrast = contrast
        self.tau, self.mask_source, self.high_thre = tau, mask_source, high_thre
        self.enqueue_thr, self.min_tokens, self.min_fill = enqueue_thr, min_tokens, min_fill
        self.update, self.momentum, self.cumulative_mask = update, momentum, cumulative_mask
        self.kmeans_every, self.kmeans_iters = kmeans_every, kmeans_iters
        if mixup_partner not in ("image", "region") or enqueue_score not in ("cam_gap", "logits"):
            raise ConfigError(
                f"rca mixup_partner must be image/region and enqueue_score "
                f"cam_gap/logits, got {mixup_partner!r}, {enqueue_score!r}"
            )
        self.mixup_p, self.mixup_alpha, self.mixup_partner = mixup_p, mixup_alpha, mixup_partner
        self.enqueue_score = enqueue_score
        self.aux_cam_until_iter = aux_cam_until_iter
        self.seed, self.dist = seed, dist_info

    def active(self, iteration: int) -> bool:  # the memory fills even when the weight is 0
        return iteration >= self.start_iter

    def compute(self, state: StepState) -> dict[str, Tensor]:
        it = state.iteration
        raw = getattr(state.feats, "raw_tokens", state.feats.tokens)
        grid = tuple(raw.shape[-2:])
        present = state.cls_label > 0  # (B, K)
        masks = (
            region_masks(self.mask_source, state, grid, self.high_thre, self.aux_cam_until_iter)
            * present[:, :, None, None]
        )
        n_tok = masks.sum(dim=(-2, -1))  # (B, K)
        region_ok = present & (n_tok >= self.min_tokens)
        contrast = self.contrast and self.weight > 0
        with torch.set_grad_enabled(contrast and torch.is_grad_enabled()):
            z = self.proj(raw).float()  # (B, h, w, d)
        with full_precision(z), torch.set_grad_enabled(contrast and torch.is_grad_enabled()):
            pooled = torch.einsum("bkhw,bhwd->bkd", masks, z) / n_tok.clamp_min(1)[..., None]
            r = F.normalize(pooled, dim=-1)
        self._write(state, masks, z, r, present, n_tok, region_ok)
        if not contrast:
            return {}
        with full_precision(z):
            return {"rca": self._contrast(r, region_ok, it)}

    def _write(
        self,
        state: StepState,
        masks: Tensor,
        z: Tensor,
        r: Tensor,
        present: Tensor,
        n_tok: Tensor,
        region_ok: Tensor,
    ) -> None:
        """Enqueue the confident regions (all ranks'), refresh the centroids when due."""
        it = state.iteration
        with torch.no_grad(), full_precision(z):
            emb = r.detach()
            if self.cumulative_mask:
                emb = F.normalize(self._cumulative_pool(masks, z.detach(), present, n_tok), dim=-1)
            enq = region_ok & (torch.sigmoid(self._enqueue_logits(state)) > self.enqueue_thr)
            self.memory.enqueue(
                all_gather_cat(emb.contiguous(), self.dist),
                all_gather_cat(enq, self.dist),
                self.update,
                self.momentum,
            )
            if (it + 1) % self.kmeans_every == 0:
                self.memory.refresh_centroids(
                    self.kmeans_iters, step_seed(self.seed, it, 0, 0x524341)
                )

    def _enqueue_logits(self, state: StepState) -> Tensor:
        """The image-class scores the enqueue thresholds: GAP of the final CAM (official:
        the CAM of the aggregated features), or ToCo's max-pooled image logits."""
        if self.enqueue_score == "logits":
            return state.logits.detach().float()
        if state.model is None:
            raise RuntimeError("rca enqueue_score 'cam_gap' needs StepState.model")
        cam = state.model.classifier.cam(state.feats.tokens.detach())
        return cam.float().mean(dim=(-2, -1))

    @staticmethod
    def _cumulative_pool(masks: Tensor, z: Tensor, present: Tensor, n_tok: Tensor) -> Tensor:
        """The official enqueue: class k of an image pooled under the product of the masks of
        its present classes up to k, divided by the size of its own mask."""
        factors = torch.where(present[:, :, None, None], masks, torch.ones_like(masks))
        cum = factors.cumprod(dim=1) * present[:, :, None, None]
        return torch.einsum("bkhw,bhwd->bkd", cum, z) / n_tok.clamp_min(1)[..., None]

    def mixup_plan(self, usable: Tensor, iteration: int) -> tuple[Tensor, Tensor]:
        """Each query region's mixup partner and lambda: (partner (B K,) flat region index,
        lam (B K,)); lam = 1 means no mixing.

        'image' (official): image b's partner image is perm(b) of a random permutation (b
        itself allowed), and each of its regions draws a uniformly random usable region of that
        image; 'region': a uniformly random usable region of the batch. lam ~ Beta(a, a) with
        probability `mixup_p`; 1 where the partner is not usable. usable: (B, K) bool."""
        b, k = usable.shape
        dev = usable.device
        gen = step_generator(dev, self.seed, iteration, self.dist.rank, 0x4D4958)
        flat_ok = usable.reshape(-1)
        allowed = flat_ok[None].expand(b * k, b * k)
        if self.mixup_partner == "image":
            perm = torch.randperm(b, generator=gen, device=dev)
            image_of = torch.arange(b * k, device=dev) // k
            allowed = allowed & (image_of[None] == perm.repeat_interleave(k)[:, None])
        # Gumbel-max: a uniform draw among the allowed regions (any, if none is allowed).
        gumbel = -torch.log(
            -torch.log(torch.rand(b * k, b * k, generator=gen, device=dev).clamp(1e-12, 1 - 1e-7))
        )
        partner = (gumbel + torch.where(allowed, 0.0, float("-inf"))).argmax(dim=1)
        rng = np.random.default_rng(step_seed(self.seed, iteration, self.dist.rank, 0x4C414D))
        lam = torch.from_numpy(rng.beta(self.mixup_alpha, self.mixup_alpha, b * k)).float()
        mix = torch.from_numpy(rng.random(b * k) < self.mixup_p)
        lam = torch.where(mix, lam, torch.ones_like(lam)).to(dev)
        return partner, torch.where(flat_ok[partner], lam, torch.ones_like(lam))

    def _contrast(self, r: Tensor, region_ok: Tensor, iteration: int) -> Tensor:
        """Mean over the usable regions of lambda L(q, c) + (1 - lambda) L(q, c') with
        q = normalise(lambda r + (1 - lambda) r'), r' the partner region of class c'."""
        b, k, d = r.shape
        mem = self.memory
        ready = mem.count >= max(1, math.ceil(self.min_fill * mem.size))  # (K,)
        target = torch.arange(k, device=r.device).repeat(b)  # (B K,)
        flat = r.reshape(b * k, d)
        usable = region_ok & ready[None]
        partner, lam = self.mixup_plan(usable, iteration)
        q = F.normalize(lam[:, None] * flat + (1 - lam[:, None]) * flat[partner], dim=-1)
        own, other = contrast_per_query(
            q, [target, target[partner]], mem.mem, mem.filled(), self.tau
        )
        return masked_mean(lam * own + (1 - lam) * other, usable.reshape(-1))


@dataclass
class RCASettings(PluginSettings):
    """RCA's settings (YAML section `plugins: {rca: ...}`, flags `--rca-*`)."""

    # `before=`: what stored configs that predate a setting did (gated residual fusion, no
    # coarse head, enqueue on ToCo's logits, mixup partner any region of the batch).
    weight: float = setting(0.1, "weight of the RCA region contrast")
    dim: int = setting(256, "embedding width d")
    mem_size: int = setting(500, "memory slots L per class")
    tau: float = setting(0.07, "contrast temperature")
    contrast: bool = setting(True, "region-to-memory contrast loss")
    aggregation: bool = setting(
        True, "aggregation of the final tokens over the memory centroids (training and inference)"
    )
    aggregation_insert: str = setting(
        "all",
        "where the aggregation rewrites the tokens: every "
        "encoder pass (classifier, CAMs, PTC, decoder) or only the "
        "decoder's input",
        ["all", "decoder"],
    )
    fusion: str = setting(
        "concat",
        "aggregation fusion: X' = 1x1([X; O]) initialised to the "
        "identity (official form) or X + gamma O with a zero-initialised gate",
        ["concat", "gate"],
        before="gate",
    )
    coarse_head: bool = setting(
        True,
        "the official coarse pre-aggregation head (1x1 classifier "
        "on the tokens before aggregation; its CAM gives the region "
        "masks, loss rca_coarse)",
        before=False,
    )
    w_coarse: float = setting(
        0.4,
        "weight of the coarse head's classification loss (official "
        "0.4; absolute, not times the plug-in weight)",
        renamed_from=("coarse_weight",),
    )
    coarse_pool: str = setting(
        "gap",
        "pooling of the coarse head's CAM for its loss (official GAP; gmp: ToCo's)",
        ["gap", "gmp"],
    )
    attention: str = setting(
        "softmax",
        "aggregation attention: softmax over centroids (scaled "
        "by sqrt(d)) or the official unnormalised dot",
        ["softmax", "dot"],
    )
    update: str = setting(
        "fifo",
        "memory write: FIFO overwrite or the official EMA blend into the slot",
        ["fifo", "ema"],
    )
    momentum: float = setting(0.99, "EMA-slot momentum (update ema)")
    noise_init: bool = setting(
        False, "memory starts as N(0,1) noise counted as filled (official code) instead of empty"
    )
    cumulative_mask: bool = setting(
        False,
        "enqueue pools each class under the product of the "
        "masks of the image's earlier classes (official bug)",
    )
    mask_source: str = setting(
        "coarse_mean",
        "region masks: softmax(coarse head CAM) > its "
        "spatial mean (official), token pseudo labels, CAM > high_thre, "
        "or softmax(online CAM) > its mean",
        ["coarse_mean", "pseudo_label", "cam_thr", "cam_mean"],
    )
    enqueue_thr: float = setting(0.7, "enqueue a region when sigmoid(image score) > this")
    enqueue_score: str = setting(
        "cam_gap",
        "image score of the enqueue: GAP of the final CAM (official) or ToCo's max-pooled logits",
        ["cam_gap", "logits"],
        before="logits",
    )
    min_tokens: int = setting(4, "ignore regions of fewer tokens")
    min_fill: float = setting(
        0.0,
        "the contrast uses a class once this fraction of its memory "
        "is filled (0: from its first entry; the projection is trained "
        "from the first write only then)",
    )
    num_centroids: int = setting(10, "k-means centroids per class")
    kmeans_every: int = setting(500, "k-means refresh period (iterations)")
    kmeans_iters: int = setting(10, "Lloyd steps per refresh")
    mixup_p: float = setting(1.0, "probability of mixing a query with another region (official: 1)")
    mixup_alpha: float = setting(8.0, "mixup lambda ~ Beta(alpha, alpha)")
    mixup_partner: str = setting(
        "image",
        "mixup partner: a random region of the image a random "
        "permutation pairs with the query's (official), or any region "
        "of the batch",
        ["image", "region"],
        before="region",
    )

    def check(self, cfg, need, key) -> None:
        for name in (
            "dim",
            "mem_size",
            "tau",
            "num_centroids",
            "kmeans_every",
            "kmeans_iters",
            "min_tokens",
            "mixup_alpha",
        ):
            need(
                getattr(self, name) > 0, f"{key(name)} must be positive, got {getattr(self, name)}"
            )
        need(
            self.contrast or self.aggregation,
            f"RCA with both {key('contrast')} and {key('aggregation')} off does nothing",
        )
        need(
            self.num_centroids <= self.mem_size,
            f"{key('num_centroids')} ({self.num_centroids}) exceeds {key('mem_size')} "
            f"({self.mem_size})",
        )
        for name in ("momentum", "enqueue_thr", "min_fill", "mixup_p"):
            need(
                0 <= getattr(self, name) <= 1,
                f"{key(name)} must be in [0, 1], got {getattr(self, name)}",
            )
        need(self.momentum < 1, f"{key('momentum')} must be < 1 (1 never writes the memory)")
        need(self.w_coarse >= 0, f"{key('w_coarse')} must be >= 0, got {self.w_coarse}")
        need(
            self.coarse_head or self.mask_source != "coarse_mean",
            f"{key('mask_source')} coarse_mean needs {key('coarse_head')}",
        )


def build_rca_memory(s: RCASettings, num_classes: int) -> RCAMemory:
    return RCAMemory(num_classes - 1, s.mem_size, s.dim, s.num_centroids, noise_init=s.noise_init)


def find_aggregation(model: Optional[nn.Module]) -> Optional[RCAAggregation]:
    """The network's RCAAggregation (feature hook or decoder input), if it has one."""
    if model is None:
        return None
    return next((m for m in model.modules() if isinstance(m, RCAAggregation)), None)


def attach_rca(s: RCASettings, cfg, model: nn.Module, num_classes: int) -> None:
    """Put the aggregation into the network (nothing when it is off)."""
    if not s.aggregation:
        return
    aggregation = RCAAggregation(
        model.backbone.embed_dim, build_rca_memory(s, num_classes), s.attention, s.fusion
    )
    if s.aggregation_insert == "all":
        model.feature_hooks.append(aggregation)
    else:
        model.decoder = AggregatedDecoder(aggregation, model.decoder)


def build_rca(s: RCASettings, ctx: BuildContext) -> list[LossModule]:
    """The loss module; it shares the memory of the network's aggregation when there is one."""
    cfg = ctx.cfg
    aggregation = find_aggregation(ctx.model)
    if s.aggregation and ctx.model is not None and aggregation is None:
        raise RuntimeError(
            "RCA aggregation is on but the model has none (build the model with "
            "toco.build.build_model)"
        )
    memory = aggregation.memory if aggregation is not None else build_rca_memory(s, ctx.num_classes)
    contrast = s.contrast and s.weight > 0
    coarse = (
        [RCACoarseHead(ctx.embed_dim, ctx.num_classes, s.w_coarse, s.coarse_pool)]
        if s.coarse_head
        else []
    )
    return coarse + [
        RegionalContrast(
            ctx.embed_dim,
            ctx.num_classes,
            memory,
            weight=s.weight if contrast else 1.0,
            start_iter=s.start(cfg),
            contrast=contrast,
            dim=s.dim,
            tau=s.tau,
            mask_source=s.mask_source,
            high_thre=cfg.high_thre,
            enqueue_thr=s.enqueue_thr,
            min_tokens=s.min_tokens,
            min_fill=s.min_fill,
            update=s.update,
            momentum=s.momentum,
            cumulative_mask=s.cumulative_mask,
            kmeans_every=s.kmeans_every,
            kmeans_iters=s.kmeans_iters,
            mixup_p=s.mixup_p,
            mixup_alpha=s.mixup_alpha,
            mixup_partner=s.mixup_partner,
            enqueue_score=s.enqueue_score,
            aux_cam_until_iter=cfg.aux_cam_until_iter,
            seed=cfg.seed,
            dist_info=ctx.dist_info,
        )
    ]


register(
    Plugin(
        "rca",
        RCASettings,
        "RCA: regional memory bank, region contrast and memory "
        "aggregation (the aggregation also runs at inference)",
        build_rca,
        attach=attach_rca,
    )
)
