"""The ToCo network: ViT encoder + CAM classifiers + LargeFOV decoder + CTC projection heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.backbone import IMAGENET_MEAN, IMAGENET_STD, EncoderOutput, ViTBackbone
from models.heads import CAMClassifier, CTCHead, EMATeacher, LargeFOV


class ToCoNet(nn.Module):
    """Single-stage WSSS segmenter. Takes images in [0, 1]; normalisation is inside the model.

    Args:
        backbone: the encoder.
        num_classes: C, background included.
        decoder_dim: LargeFOV width (512 in ToCo).
        ctc_out_dim: output width of the CTC projection head (1024 in ToCo).
        ema_momentum: momentum of the CTC teacher head.
        ctc_hidden_dim: width of the CTC head's MLP (2048 in ToCo).
        pixel_mean, pixel_std: input normalisation (ToCo: ImageNet's, whatever the backbone).
    """

    def __init__(
        self,
        backbone: ViTBackbone,
        num_classes: int,
        decoder_dim: int = 512,
        ctc_out_dim: int = 1024,
        ema_momentum: float = 0.9,
        ctc_hidden_dim: int = 2048,
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        dim = backbone.embed_dim
        self.num_classes = num_classes
        self.backbone = backbone
        self.classifier = CAMClassifier(dim, num_classes - 1)
        self.aux_classifier = CAMClassifier(dim, num_classes - 1)
        self.decoder = LargeFOV(dim, num_classes, hidden_dim=decoder_dim)
        self.proj_head = CTCHead(dim, out_dim=ctc_out_dim, hidden_dim=ctc_hidden_dim)
        self.proj_head_teacher = EMATeacher(self.proj_head, momentum=ema_momentum)
        # Modules mapping EncoderOutput -> EncoderOutput (e.g. RCA's memory aggregation), run
        # inside `encode` so training, the CAM passes and inference all see the same features.
        self.feature_hooks = nn.ModuleList()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def encode(self, images: Tensor) -> EncoderOutput:
        """images: (B, 3, H, W) in [0, 1]."""
        feats = self.backbone((images - self.pixel_mean) / self.pixel_std)
        for hook in self.feature_hooks:
            feats = hook(feats)
        return feats

    def classify(self, feats: EncoderOutput) -> tuple[Tensor, Tensor]:
        """Image logits from the final and the aux tokens, each (B, C-1)."""
        return self.classifier(feats.tokens), self.aux_classifier(feats.aux_tokens)

    def cams(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Raw (cam, cam_aux) at token resolution; the decoder is not run."""
        return self.cams_of(self.encode(images))

    def cams_of(self, feats: EncoderOutput) -> tuple[Tensor, Tensor]:
        """Raw (cam, cam_aux) of encoder features computed already."""
        return self.classifier.cam(feats.tokens), self.aux_classifier.cam(feats.aux_tokens)

    def segment(self, feats: EncoderOutput) -> Tensor:
        """Segmentation logits (B, C, h, w) at the token stride."""
        return self.decoder(feats.tokens)

    def forward(self, images: Tensor) -> Tensor:
        """Inference: segmentation logits at the token stride."""
        return self.segment(self.encode(images))

    def project(self, cls_tokens: Tensor) -> Tensor:
        """Student CTC projection of class tokens (N, D) → (N, K)."""
        return self.proj_head(cls_tokens)

    @torch.no_grad()
    def project_teacher(self, cls_tokens: Tensor) -> Tensor:
        """Teacher CTC projection of detached class tokens."""
        return self.proj_head_teacher(cls_tokens.detach())

    def update_teacher(self) -> None:
        self.proj_head_teacher.update(self.proj_head)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """ToCo's four groups: backbone (non-norm), backbone norms, cls/CTC heads, decoder.

        The teacher and frozen parameters (pos_embed, the weight-norm magnitudes) are left out.
        """

        def trainable(named):
            return [(n, p) for n, p in named if p.requires_grad]

        backbone = trainable(self.backbone.named_parameters())
        heads = trainable(
            list(self.classifier.named_parameters())
            + list(self.aux_classifier.named_parameters())
            + list(self.proj_head.named_parameters())
            + list(self.feature_hooks.named_parameters())
        )
        return [
            [p for n, p in backbone if "norm" not in n],
            [p for n, p in backbone if "norm" in n],
            [p for _, p in heads],
            [p for _, p in trainable(self.decoder.named_parameters())],
        ]
