"""ToCo's own loss terms as `LossModule`s: the engine treats them exactly like plug-ins."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from toco.method.losses import ctc_loss, multilabel_loss, ptc_loss, seg_loss
from toco.method.step import LossModule, StepState


def grouped_mean(fn: Callable[..., Tensor], group_size: int, *tensors: Tensor) -> Tensor:
    """fn over consecutive groups of `group_size` images, averaged (0: one group).

    ToCo normalises PTC and seg over each GPU's 2-image batch; grouping reproduces that on
    any number of devices.
    """
    batch = tensors[0].shape[0]
    if group_size <= 0 or group_size >= batch:
        return fn(*tensors)
    return torch.stack([fn(*(t[i:i + group_size] for t in tensors))
                        for i in range(0, batch, group_size)]).mean()


class GroupedLossModule(LossModule):
    """A loss normalised over groups of `group_size` images (see `grouped_mean`)."""

    def __init__(self, weight: float, start_iter: int = 0, group_size: int = 0) -> None:
        super().__init__(weight, start_iter)
        self.group_size = group_size


class ClassificationLoss(LossModule):
    """Multi-label soft-margin loss on the final (`cls`) and aux (`cls_aux`) image logits."""

    names = ("cls", "cls_aux")

    def compute(self, state: StepState) -> dict[str, Tensor]:
        return {"cls": multilabel_loss(state.logits, state.cls_label),
                "cls_aux": multilabel_loss(state.aux_logits, state.cls_label)}


class PatchTokenContrast(GroupedLossModule):
    """PTC: pull final-layer tokens of the same aux-CAM label together, push others apart."""

    names = ("ptc",)

    def compute(self, state: StepState) -> dict[str, Tensor]:
        return {"ptc": grouped_mean(ptc_loss, self.group_size, state.feats.tokens,
                                    state.token_label)}


class ClassTokenContrast(LossModule):
    """CTC: teacher class tokens of the global views vs student class tokens of all crops."""

    names = ("ctc",)

    def __init__(self, weight: float, start_iter: int = 0, temperature: float = 0.5,
                 always_add_negative_term: bool = False) -> None:
        super().__init__(weight, start_iter)
        self.temperature = temperature
        self.always_add_negative_term = always_add_negative_term

    def compute(self, state: StepState) -> dict[str, Tensor]:
        out = state.ctc
        return {"ctc": ctc_loss(out.student, out.teacher, out.flags, self.temperature,
                                always_add_negative_term=self.always_add_negative_term)}


class SegmentationLoss(GroupedLossModule):
    """Background/foreground-balanced CE of the decoder against the refined pseudo label."""

    names = ("seg",)
    needs_decoder = True

    def compute(self, state: StepState) -> dict[str, Tensor]:
        label = state.pseudo_label
        logits = F.interpolate(state.seg_logits, size=label.shape[-2:], mode="bilinear",
                               align_corners=False)
        return {"seg": grouped_mean(seg_loss, self.group_size, logits, label)}
