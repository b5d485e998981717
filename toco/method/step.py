"""What one training step knows, handed to every loss module.

The engine fills a `StepState` once per iteration (dataset → model → pseudo labels) and passes it
to each `LossModule`; each returns named, unweighted losses. The costly pseudo labels are computed
on first use only, so a loss that is switched off costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, NamedTuple, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone import EncoderOutput

# StepState.extras key: [(scale, mirrored, final tokens (B, D, h, w))] of the CAM passes.
CAM_VIEWS = "cam_views"


class CTCOutputs(NamedTuple):
    """Class-token projections for CTC: student (V*B, K) and teacher (2*B, K), both view-major,
    and per-crop flags (B, V), 1 = positive (the two global views are always positive)."""

    student: Tensor
    teacher: Tensor
    flags: Tensor


@dataclass(eq=False)
class StepState:
    """Tensors of one step. Shapes: B images, D channels, C classes incl. background.

    Attributes:
        iteration: 0-based training iteration.
        images: main view, (B, 3, H, W) in [0, 1].
        cls_label: multi-hot image labels y, (B, C-1).
        img_box: (B, 4) [y0, y1, x0, x1], the part of each crop holding real pixels.
        feats: encoder output of the main view (class token, final and aux token maps; with grad).
        logits, aux_logits: image logits, (B, C-1).
        seg_logits: decoder output, (B, C, h, w); None in a step where no active loss module
            `needs_decoder` (the decoder is not run then).
        cam, cam_aux: multi-scale, min-max normalised CAMs (B, C-1, H, W), no grad.
        pseudo_label, token_label, ctc: computed on first access by the engine's providers.
        extras: free room for plug-ins to share tensors with each other (and the cache of
            `rescaled_view`).
        model: the network being trained (its `encode` and CAM classifiers), for plug-ins that
            need extra passes or the classifier weights; None when a state is built by hand.
    """

    iteration: int
    images: Tensor
    cls_label: Tensor
    img_box: Tensor
    feats: EncoderOutput
    logits: Tensor
    aux_logits: Tensor
    seg_logits: Optional[Tensor]
    cam: Tensor
    cam_aux: Tensor
    make_pseudo_label: Callable[["StepState"], Tensor]
    make_token_label: Callable[["StepState"], Tensor]
    make_ctc: Callable[["StepState"], CTCOutputs]
    extras: dict[str, Any] = field(default_factory=dict)
    model: Optional[nn.Module] = None

    @cached_property
    def pseudo_label(self) -> Tensor:
        """PAR-refined pixel pseudo label (B, H, W): class id, 0 background, 255 ignore."""
        return self.make_pseudo_label(self)

    @cached_property
    def token_label(self) -> Tensor:
        """Token-grid pseudo label (B, h, w) from the aux CAM, for patch-token contrast."""
        return self.make_token_label(self)

    @cached_property
    def ctc(self) -> CTCOutputs:
        """Global + local views through the encoder and the CTC heads (extra encoder passes)."""
        return self.make_ctc(self)

    def rescaled_view(self, scale: float, flip: bool = False) -> tuple[Tensor, EncoderOutput]:
        """The main view bilinearly resized by `scale` (then mirrored if `flip`) and its encoder
        output, with grad: one extra encoder pass, run on first use and cached per (scale, flip).

        Pixel-aligned with `images` up to the scale (and the mirror), unlike the CTC views.
        """
        key = ("rescaled_view", float(scale), bool(flip))
        if key not in self.extras:
            if self.model is None:
                raise RuntimeError("StepState.rescaled_view needs the state's model")
            h, w = self.images.shape[-2:]
            size = (max(1, int(h * scale)), max(1, int(w * scale)))
            x = F.interpolate(self.images, size=size, mode="bilinear", align_corners=False)
            if flip:
                x = x.flip(-1)
            self.extras[key] = (x, self.model.encode(x))
        return self.extras[key]


class LossModule(nn.Module):
    """A weighted, scheduled loss term. Subclasses implement `compute`.

    Args:
        weight: multiplier of every loss the module returns.
        start_iter: the module is active from this iteration on (inclusive).
    """

    names: tuple[str, ...] = ()
    # Values `compute` returns that are logged statistics, not losses (no weight, no gradient).
    stat_names: tuple[str, ...] = ()
    # True for a term that reads `state.seg_logits`: the engine runs the decoder only then.
    needs_decoder: bool = False
    # True for a term that reads the final tokens of ToCo's multi-scale CAM passes
    # (`state.extras[CAM_VIEWS]`, see toco.method.cam.split_cam_passes): the engine keeps them
    # only then.
    needs_cam_views: bool = False

    def __init__(self, weight: float, start_iter: int = 0) -> None:
        super().__init__()
        self.weight = weight
        self.start_iter = start_iter

    def active(self, iteration: int) -> bool:
        return self.weight > 0 and iteration >= self.start_iter

    def compute(self, state: StepState) -> dict[str, Tensor]:
        raise NotImplementedError

    def pseudo_label_cam(self, state: StepState, cam: Tensor) -> Tensor:
        """Hook of the pixel pseudo labels: the normalised CAM (B, C-1, H, W) in [0, 1] that is
        thresholded and PAR-refined, rewritten by this module (e.g. fused with another map).

        Called by the pseudo-label provider for every active module, in module order, before the
        label exists; must not need grad (it runs without). Default: unchanged."""
        return cam
