"""Test-time protocols: how an image becomes segmentation logits and CAMs.

Three published protocols, by name:

- ``train-val``: ToCo's in-training validation. Resize to the run's validation square (its
  ``val_size``, else its ``crop_size``: 448 in the recipes); segmentation at one scale without
  flip; CAMs at the run's ``val_scales`` (1.0, 0.5, 1.5) with flips (pseudo labels: its
  training ``cam_scales``).
- ``voc-ms``: ToCo's VOC inference tool. Original image size; scales 1.0, 1.5, 1.25; each
  scale's flip pair fused by SUM of the logits, the scales by element-wise MAX.
- ``coco-ms``: ToCo's COCO inference tool. Resize to 448 x 448 first; scales 1.0, 1.25, 1.5;
  flip pair fused by MAX, scales by SUM.

In every protocol the logits of each pass are upsampled to the label's size before any
fusion, and CAMs always use ToCo's multi-scale CAM rule (flip MAX, scale SUM, then min-max
normalisation). The dense CRF is an option of each protocol.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from models.network import ToCoNet
from toco.config import TrainConfig
from toco.errors import ConfigError
from toco.method.inference import predict_cams, predict_seg_logits

PROTOCOL_NAMES = ("train-val", "voc-ms", "coco-ms")

# ToCo's CRF for segmentation predictions (tools/infer_seg_*): 10 mean-field steps, smoothness
# kernel sxy 1 / weight 1, appearance kernel sxy 121 / srgb 5 / weight 4.
SEG_CRF = {
    "iterations": 10,
    "gaussian_sxy": 1.0,
    "gaussian_w": 1.0,
    "bilateral_sxy": 121.0,
    "bilateral_srgb": 5.0,
    "bilateral_w": 4.0,
}
# ToCo's CRF for pseudo labels (tools/infer_cam_crf_label.py).
PSEUDO_CRF = {
    "iterations": 10,
    "gaussian_sxy": 3.0,
    "gaussian_w": 3.0,
    "bilateral_sxy": 36.0,
    "bilateral_srgb": 3.0,
    "bilateral_w": 4.0,
}


@dataclass(frozen=True)
class Protocol:
    """Everything that decides a number besides the weights and the data.

    size: resize inputs to a size x size square first (None: original size).
    seg_scales, flip, flip_fusion, scale_fusion: segmentation passes and their fusion.
    cam_scales, cam_flip: multi-scale CAM scales, and whether each adds its mirror image.
    patch_fit: "pad" (our fix of B12) or "floor" (the official tools), see toco.method.inference.
    crf: None, or the dense-CRF backend ("torch" or "pydensecrf").
    """

    name: str
    size: Optional[int]
    seg_scales: tuple[float, ...]
    flip: bool
    flip_fusion: str
    scale_fusion: str
    cam_scales: tuple[float, ...]
    patch_fit: str = "pad"
    cam_flip: bool = True
    crf: Optional[str] = None
    crf_params: dict[str, float] = field(default_factory=dict)

    def seg_logits(self, model: ToCoNet, image: Tensor) -> Tensor:
        """Fused segmentation logits (B, C, H, W) at the image's size."""
        return predict_seg_logits(
            model,
            image,
            self.seg_scales,
            flip=self.flip,
            size=self.size,
            flip_fusion=self.flip_fusion,
            scale_fusion=self.scale_fusion,
            patch_fit=self.patch_fit,
        )

    def cams(
        self, model: ToCoNet, image: Tensor, scales: Optional[Sequence[float]] = None
    ) -> tuple[Tensor, Tensor]:
        """Normalised multi-scale (cam, cam_aux) at the image's size."""
        return predict_cams(
            model,
            image,
            scales or self.cam_scales,
            flip=self.cam_flip,
            size=self.size,
            patch_fit=self.patch_fit,
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["seg_scales"], out["cam_scales"] = list(self.seg_scales), list(self.cam_scales)
        if not self.crf:
            out["crf_params"] = None
        return out


def named_protocol(name: str, cfg: TrainConfig, mode: str = "seg") -> Protocol:
    """The published protocol `name`, with the run's own validation settings for train-val.

    CAM scales are the run's validation scales, or for pseudo labels its training scales.
    """
    cam_scales = tuple(float(s) for s in (cfg.cam_scales if mode == "pseudo" else cfg.val_scales))
    if name == "train-val":
        return Protocol(
            name, cfg.val_size or cfg.crop_size, (1.0,), False, "sum", "max", cam_scales
        )
    if name == "voc-ms":
        return Protocol(name, None, (1.0, 1.5, 1.25), True, "sum", "max", cam_scales)
    if name == "coco-ms":
        return Protocol(name, 448, (1.0, 1.25, 1.5), True, "max", "sum", cam_scales)
    raise ConfigError(f"unknown --protocol {name!r}; choose one of {', '.join(PROTOCOL_NAMES)}")


def build_protocol(
    name: str,
    cfg: TrainConfig,
    mode: str = "seg",
    *,
    scales: Optional[Sequence[float]] = None,
    flip: Optional[bool] = None,
    size: Optional[int] = None,
    flip_fusion: Optional[str] = None,
    scale_fusion: Optional[str] = None,
    cam_scales: Optional[Sequence[float]] = None,
    cam_flip: Optional[bool] = None,
    patch_fit: str = "pad",
    crf: Optional[str] = None,
    crf_params: Optional[dict[str, float]] = None,
) -> Protocol:
    """A named protocol with explicit overrides (None keeps the protocol's value).

    `size` 0 means the original size. Overridden protocols keep their name with a "+custom"
    suffix, so a JSON never claims a published protocol it did not follow. `patch_fit` is not
    an override of the protocol (the official tools floor; the fix of B12 pads) and is recorded
    on its own.
    """
    base = named_protocol(name, cfg, mode)
    changes: dict[str, Any] = {}
    for key, value in (("seg_scales", scales), ("cam_scales", cam_scales)):
        if value is not None:
            if not value or any(s <= 0 for s in value):
                raise ConfigError(f"--scales must be positive numbers, got {list(value)}")
            changes[key] = tuple(float(s) for s in value)
    for key, value in (("flip", flip), ("cam_flip", cam_flip)):
        if value is not None:
            changes[key] = bool(value)
    if size is not None:
        if size < 0:
            raise ConfigError(f"--size must be >= 0 (0 = original size), got {size}")
        changes["size"] = size or None
    if flip_fusion is not None:
        changes["flip_fusion"] = flip_fusion
    if scale_fusion is not None:
        changes["scale_fusion"] = scale_fusion
    custom = {k: v for k, v in changes.items() if getattr(base, k) != v}
    proto = dataclasses.replace(
        base, **custom, patch_fit=patch_fit, name=base.name + ("+custom" if custom else "")
    )
    if crf:
        proto = dataclasses.replace(proto, crf=crf, crf_params=dict(crf_params or SEG_CRF))
    return proto


def apply_crf(
    protocol: Protocol,
    image_uint8: Tensor,
    probs: Tensor,
    params: Optional[dict[str, float]] = None,
) -> Tensor:
    """Dense-CRF-refined probabilities with the protocol's backend and parameters."""
    from toco.method.crf import CRF_BACKENDS

    return CRF_BACKENDS[protocol.crf](image_uint8, probs, **(params or protocol.crf_params))


def seg_prediction(protocol: Protocol, logits: Tensor, image_uint8: Tensor) -> Tensor:
    """(B, H, W) labels from fused logits: argmax, after the CRF on their softmax if enabled."""
    logits = logits.float()
    if protocol.crf:
        return apply_crf(protocol, image_uint8, torch.softmax(logits, dim=1)).argmax(1)
    return logits.argmax(1)
