"""The Python API: a trained model that turns any image into a mask, class scores and CAMs.

    from toco import load_segmenter
    seg = load_segmenter("model.safetensors", device="cpu")
    pred = seg.predict("photo.jpg")        # or a PIL image, a numpy array, or a list of them
    pred.mask, pred.labels, pred.scores

Predictions follow an evaluation protocol (toco.evaluation.protocol, `train-val` by default),
so a mask here is the mask evaluate.py scores for the same image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from toco.errors import UserError
from toco.images import ImageInput, to_rgb
from toco.method.inference import resize, token_maps

MAX_CLASSES = 255  # background included; 255 is the ignore value of every mask


@dataclass
class Prediction:
    """What the model says about one image, at the size the image is displayed at.

    mask: (H, W) uint8 class ids, 0 = background (`Segmenter.class_names` names them).
    labels: the foreground classes present in `mask`, in class order.
    scores: every foreground class -> sigmoid of the classifier's image logit (CAM head).
    cam: (C-1, H, W) float32 class activation maps in [0, 1] (each class min-max normalised
        over the image), only when asked for with `predict(..., cam=True)`.
    """

    mask: np.ndarray
    labels: list[str]
    scores: dict[str, float]
    cam: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image and the mask."""
        return int(self.mask.shape[1]), int(self.mask.shape[0])


class Segmenter:
    """A loaded model plus the protocol its predictions follow; see `load_segmenter`."""

    def __init__(
        self,
        model,
        cfg,
        class_names: Sequence[str],
        protocol,
        device: torch.device,
        iteration: int = 0,
    ) -> None:
        if len(class_names) != model.num_classes:
            raise UserError(
                f"{len(class_names)} class names for a model of {model.num_classes} classes"
            )
        if model.num_classes > MAX_CLASSES:
            raise UserError(
                f"a model of {model.num_classes} classes: masks are uint8 index "
                f"images (255 = ignore), so at most {MAX_CLASSES} classes fit"
            )
        self.model, self.cfg, self.protocol, self.device = model, cfg, protocol, device
        self.class_names = tuple(class_names)
        self.iteration = iteration

    @property
    def foreground_names(self) -> tuple[str, ...]:
        return self.class_names[1:]

    def predict(
        self, images: ImageInput | Sequence[ImageInput], cam: bool = False
    ) -> Prediction | list[Prediction]:
        """One Prediction for one image; a list for a list (or tuple) of images.

        Images of the same model-input size are run as one batch (train-val resizes every
        image to one square, so any list batches); the result is the same as one by one.
        """
        single = not isinstance(images, (list, tuple))
        arrays = [to_rgb(x) for x in ([images] if single else images)]
        preds = self.predict_arrays(arrays, cam=cam)
        return preds[0] if single else preds

    def predict_arrays(self, arrays: Sequence[np.ndarray], cam: bool = False) -> list[Prediction]:
        """Predictions of (H, W, 3) uint8 RGB arrays (see toco.images.to_rgb)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(self._input_size(a.shape[:2]), []).append(i)
        out: list[Prediction | None] = [None] * len(arrays)
        for size, members in groups.items():
            for i, pred in zip(
                members, self._predict_group([arrays[i] for i in members], size, cam)
            ):
                out[i] = pred
        return out  # type: ignore[return-value]

    def _input_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The size images are stacked at. A protocol of ONE pass at scale 1 on a square
        (train-val) gives the same maps whether the image or the square goes in, so any images
        batch together; every other protocol upsamples each pass to the image's own size
        before fusing them, so only images of one size can share a batch."""
        p = self.protocol
        return (p.size, p.size) if self._one_pass() else (int(hw[0]), int(hw[1]))

    def _one_pass(self) -> bool:
        p = self.protocol
        return (
            bool(p.size) and tuple(p.seg_scales) == (1.0,) and not p.flip and p.patch_fit == "pad"
        )

    @torch.no_grad()
    def _predict_group(
        self, arrays: list[np.ndarray], size: tuple[int, int], cam: bool
    ) -> list[Prediction]:
        from toco.evaluation.protocol import seg_prediction

        # torch.tensor copies: the arrays PIL gives are read-only
        u8 = [torch.tensor(a).permute(2, 0, 1).to(self.device) for a in arrays]
        batch = torch.cat([resize(x[None].float().div(255), size) for x in u8])
        if self._one_pass():
            # The token-grid logits (upsampled once to each image's size below); the image
            # scores come from the same encoder pass, whose input is the scores' input.
            image_logits: list[Tensor] = []

            def segment_and_classify(x: Tensor) -> Tensor:
                feats = self.model.encode(x)
                image_logits.append(self.model.classify(feats)[0])
                return self.model.segment(feats)

            logits = token_maps(
                segment_and_classify, batch, self.model.patch_size, self.protocol.patch_fit
            )[0].float()
            scores = torch.sigmoid(image_logits[0].float()).cpu()
        else:  # already fused at the images' own size
            logits = self.protocol.seg_logits(self.model, batch).float()
            scores = self._image_scores(batch)
        cams = self.protocol.cams(self.model, batch)[0].float() if cam else None
        preds = []
        for i, image_u8 in enumerate(u8):
            hw = tuple(image_u8.shape[-2:])
            mask = seg_prediction(self.protocol, resize(logits[i : i + 1], hw), image_u8[None])
            mask_np = mask[0].to(torch.uint8).cpu().numpy()
            present = np.flatnonzero(np.bincount(mask_np.ravel(), minlength=len(self.class_names)))
            preds.append(
                Prediction(
                    mask=mask_np,
                    labels=[self.class_names[k] for k in present if k != 0],
                    scores=dict(zip(self.foreground_names, scores[i].tolist())),
                    cam=(
                        resize(cams[i : i + 1], hw)[0].clamp(0, 1).cpu().numpy()
                        if cams is not None
                        else None
                    ),
                )
            )
        return preds

    def _image_scores(self, batch: Tensor) -> Tensor:
        """(B, C-1) sigmoid of the image logits at the protocol's input size, scale 1 (padded to
        whole patches, as the segmentation passes pad)."""
        p, size = self.model.patch_size, self.protocol.size
        x = resize(batch, (size, size)) if size else batch
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        logits, _ = self.model.classify(self.model.encode(x))
        return torch.sigmoid(logits.float()).cpu()


def load_segmenter(
    path: str | os.PathLike, device: str | torch.device = "cpu", protocol: str = "train-val"
) -> Segmenter:
    """A Segmenter from a training checkpoint (`checkpoints/last.pt`) or a release file.

    device: "cpu", "cuda", "cuda:N" or "auto". protocol: "train-val" (the run's validation
    square, one pass), "voc-ms" or "coco-ms" (multi-scale with flips, as evaluate.py).
    Class names come from the release file, or for a checkpoint from its dataset.
    """
    from toco.evaluation.protocol import build_protocol
    from toco.export import load_model
    from toco.runtime import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    model, cfg, state = load_model(path, dev)
    return Segmenter(
        model,
        cfg,
        state["class_names"],
        build_protocol(protocol, cfg),
        dev,
        iteration=int(state.get("iteration", 0)),
    )
