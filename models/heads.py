"""ToCo's heads: the CAM classifier, the LargeFOV decoder and the CTC projection head."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class CAMClassifier(nn.Module):
    """Global max pooling, then a bias-free 1x1 conv: logits and CAM share the weight W."""

    def __init__(self, dim: int, num_fg_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, num_fg_classes, kernel_size=1, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, D, h, w) → image logits (B, C-1); pooling comes before the 1x1 conv."""
        return self.conv(F.adaptive_max_pool2d(tokens, 1)).flatten(1)

    def cam(self, tokens: Tensor) -> Tensor:
        """Raw class activation maps W^T F, (B, C-1, h, w): no ReLU, no normalisation."""
        return F.conv2d(tokens, self.conv.weight)


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV head: two dilated 3x3 convs (ReLU) and a 1x1 classifier, all bias-free."""

    def __init__(
        self, in_dim: int, num_classes: int, hidden_dim: int = 512, dilation: int = 5
    ) -> None:
        super().__init__()
        self.conv6 = nn.Conv2d(
            in_dim, hidden_dim, 3, padding=dilation, dilation=dilation, bias=False
        )
        self.conv7 = nn.Conv2d(
            hidden_dim, hidden_dim, 3, padding=dilation, dilation=dilation, bias=False
        )
        self.conv8 = nn.Conv2d(hidden_dim, num_classes, 1, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = F.relu(self.conv6(tokens), inplace=True)
        x = F.relu(self.conv7(x), inplace=True)
        return self.conv8(x)


class CTCHead(nn.Module):
    """DINO-style projection: MLP → L2 normalise → weight-normalised linear (unit rows, g = 1).

    Each output is a cosine in [-1, 1]; the output vector itself is not re-normalised.
    """

    def __init__(
        self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 2048, bottleneck_dim: int = 256
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # Created after the init pass on purpose: ToCo's last layer keeps PyTorch's default init.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class EMATeacher(nn.Module):
    """A frozen copy of a module, updated as θ_t ← m·θ_t + (1 − m)·θ_s (no schedule on m)."""

    def __init__(self, student: nn.Module, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        teacher_params = list(self.module.parameters())
        student_params = [p.detach() for p in student.parameters()]
        torch._foreach_mul_(teacher_params, self.momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)
