"""A timm ViT as ToCo's encoder: a summary token, final patch tokens and pre-norm aux tokens.

Supported timm families (run block by block, computing what the family's own forward computes):
ViT/DeiT (incl. distilled), ViT with register tokens (DINOv2 `*_reg4_*`), DINOv2 (patch 14),
CLIP/OpenCLIP (`norm_pre`), SigLIP (no class token: the attention-pool output stands in for it)
and EVA-02 (rotary position embeddings, final norm applied after pooling).
"""

from __future__ import annotations

import difflib
import os
from typing import NamedTuple, Optional

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from toco.errors import ConfigError, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm modules and model classes whose forward this encoder reproduces.
SUPPORTED_MODULES = ("vision_transformer", "deit", "eva")
SUPPORTED_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "Eva")
SUPPORTED_HINT = "ViT/DeiT, DINOv2, CLIP, SigLIP, EVA-02"


class EncoderOutput(NamedTuple):
    """What the encoder hands on: `cls` (B, D), `tokens` and `aux_tokens` as (B, D, h, w) maps.

    `cls` is the class token after the final norm; for a backbone without one (SigLIP) it is the
    family's own pooled image embedding (attention pool or mean), which plays its role in CTC.
    """

    cls: Tensor
    tokens: Tensor
    aux_tokens: Tensor


def resize_pos_embed(
    pos_embed: Tensor, grid: tuple[int, int], new_grid: tuple[int, int], antialias: bool = False
) -> Tensor:
    """Resize a (1, h*w, D) patch position table to `new_grid`, bicubic, align_corners=False.

    ToCo resizes without antialiasing (timm's default would antialias when shrinking, which
    changes the table for crops smaller than the pre-training size), so that is our default.
    """
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)
    if table.dtype in (torch.float16, torch.bfloat16):  # bicubic needs fp32 on some devices
        table = table.float()
    table = F.interpolate(
        table, size=new_grid, mode="bicubic", align_corners=False, antialias=antialias
    )
    return table.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)


def _unknown_backbone(name: str) -> ConfigError:
    candidates = timm.list_models("*vit*") + timm.list_models("*deit*") + timm.list_models("eva*")
    close = difflib.get_close_matches(name.split(".")[0], candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown backbone '{name}': not a timm model name.{hint}")


def create_vit(name: str, pretrained: str = "none", **kwargs) -> nn.Module:
    """Build a timm ViT by name, with weights from `pretrained`.

    `pretrained` is 'none' (random init), 'timm' (timm's own weights, from the hub or its cache),
    or a path to a local checkpoint (.pth/.bin/.safetensors with timm's or the original release's
    key names: timm converts CLIP/DINOv2/EVA checkpoints while loading).
    A missing file or an unreachable hub is an error: never a silent random init.
    """
    if not timm.is_model(name):
        raise _unknown_backbone(name)
    if not timm.models.is_model_in_modules(timm.models.get_arch_name(name), SUPPORTED_MODULES):
        raise ConfigError(
            f"backbone '{name}' is not one of the timm ViTs ToCo runs "
            f"({SUPPORTED_HINT}; timm modules {', '.join(SUPPORTED_MODULES)})"
        )
    kwargs = dict(num_classes=0, dynamic_img_size=True, **kwargs)
    if pretrained == "none":
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif pretrained == "timm":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # hub errors come in many types; all mean "no weights"
            raise UserError(
                f"could not load timm's pretrained weights for '{name}' ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Without network access, "
                "download them elsewhere and pass --pretrained /path/to/weights.safetensors"
            ) from None
    else:
        if not os.path.isfile(pretrained):
            raise UserError(
                f"--pretrained: no such file '{pretrained}' (use 'none', 'timm' or "
                "a path to a checkpoint)"
            )
        try:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=pretrained), **kwargs
            )
        except Exception as err:
            raise UserError(
                f"could not load backbone weights from '{pretrained}' into "
                f"'{name}': {type(err).__name__}: {err}"
            ) from None
    _check_supported(name, model)
    return model


def _check_supported(name: str, model: nn.Module) -> None:
    """One line at start-up for a model this encoder cannot run faithfully."""
    kind = type(model).__name__
    if kind not in SUPPORTED_CLASSES:
        raise ConfigError(
            f"backbone '{name}' is a timm {kind}; ToCo runs timm ViTs only "
            f"({', '.join(SUPPORTED_CLASSES)}: {SUPPORTED_HINT})"
        )
    if (
        model.cls_token is None
        and getattr(model, "attn_pool", None) is None
        and model.global_pool not in ("avg", "avgmax", "max")
    ):
        raise ConfigError(
            f"backbone '{name}' has neither a class token nor a pooled image "
            "embedding, so class-token contrast (CTC) has no token to use"
        )
    drop = getattr(model, "patch_drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise ConfigError(
            f"backbone '{name}': patch dropout breaks the token grid ToCo needs; "
            "build it with patch_drop_rate=0"
        )


def _norms_after_pooling(vit: nn.Module) -> bool:
    """Avg-pool models with an `fc_norm` (EVA-02) keep `norm` as Identity and normalise after
    pooling; ToCo wants normalised tokens, so it applies that norm to every token."""
    fc_norm = getattr(vit, "fc_norm", None)
    return (
        isinstance(vit.norm, nn.Identity)
        and fc_norm is not None
        and not isinstance(fc_norm, nn.Identity)
    )


class ViTBackbone(nn.Module):
    """A timm ViT run block by block, returning ToCo's three outputs.

    Args:
        name: timm model name, e.g. 'deit_base_patch16_224.fb_in1k'.
        pretrained: 'none', 'timm' or a checkpoint path (see `create_vit`).
        aux_layer: index into the blocks whose raw (pre-norm) output gives the aux tokens;
            -3 is the 10th of 12 blocks, as in ToCo.
        freeze_pos_embed: ToCo never trains the position table.
        pos_embed_antialias: resize the position table as timm's own forward does (antialiased
            bicubic, a different kernel at every size) instead of ToCo's plain bicubic.
        trainable_blocks: None trains the whole backbone (ToCo); K trains only the last K blocks
            and the final norm/pool (0 freezes the backbone).
        **kwargs: passed to `timm.create_model` (e.g. depth=6 for a shallower test model).

    Frozen parameters record no autograd graph: with nothing trainable up to a block, that block
    runs as in inference (no saved activations, no backward), so a frozen backbone costs one
    inference pass per view and only the heads are back-propagated.
    """

    def __init__(
        self,
        name: str,
        pretrained: str = "none",
        aux_layer: int = -3,
        freeze_pos_embed: bool = True,
        pos_embed_antialias: bool = False,
        trainable_blocks: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        self.vit = create_vit(name, pretrained, **kwargs)
        depth = len(self.vit.blocks)
        if not -depth <= aux_layer < depth:
            raise ConfigError(f"aux_layer {aux_layer} out of range for a {depth}-block backbone")
        self.aux_index = aux_layer % depth
        self.depth = depth
        self.embed_dim: int = self.vit.embed_dim
        self.patch_size: int = self.vit.patch_embed.patch_size[0]
        self.pos_embed_antialias = pos_embed_antialias
        self.norm_tokens_after_pooling = _norms_after_pooling(self.vit)
        cfg = getattr(self.vit, "pretrained_cfg", None) or {}
        self.pretrained_mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.pretrained_std = tuple(cfg.get("std", IMAGENET_STD))
        if self.vit.pos_embed is not None and freeze_pos_embed:
            self.vit.pos_embed.requires_grad_(False)
        if trainable_blocks is not None:
            self.train_last_blocks(trainable_blocks)
        self.grad_checkpointing = False  # set by the trainer (--grad-checkpointing)

    # ---- stages: 0 = embeddings, 1..depth = blocks, depth + 1 = final norm / pooling ----
    def stage_of(self, param_name: str) -> int:
        """Stage of a parameter named relative to this module (BEiT-style layer id)."""
        name = param_name.removeprefix("vit.")
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith(("norm.", "fc_norm.", "attn_pool.", "head.")):
            return self.depth + 1
        return 0

    def train_last_blocks(self, k: int) -> None:
        """Freeze everything but the last `k` blocks and what follows them (k=0: all frozen)."""
        if not 0 <= k <= self.depth:
            raise ConfigError(
                f"trainable_blocks {k} out of range for a {self.depth}-block "
                f"backbone (0..{self.depth})"
            )
        first = self.depth + 2 if k == 0 else self.depth + 1 - k
        for name, p in self.named_parameters():
            if self.stage_of(name) < first:
                p.requires_grad_(False)

    # ---- forward ----
    def _prefix_tokens(self, batch: int) -> list[Tensor]:
        """[class, distillation, register] tokens, in the order the family concatenates them."""
        vit = self.vit
        tokens = [getattr(vit, n, None) for n in ("cls_token", "dist_token", "reg_token")]
        return [t.expand(batch, -1, -1) for t in tokens if t is not None]

    def _add_pos_embed(self, x: Tensor) -> Tensor:
        """x: (B, h, w, D) patch embeddings → (B, prefix + h*w, D) with positions added."""
        vit = self.vit
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        prefix = self._prefix_tokens(b)
        if vit.pos_embed is None:
            return torch.cat(prefix + [x], dim=1)
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos_prefix, pos_patch = vit.pos_embed[:, :n_prefix], vit.pos_embed[:, n_prefix:]
        pos_patch = resize_pos_embed(
            pos_patch, vit.patch_embed.grid_size, (h, w), antialias=self.pos_embed_antialias
        )
        if vit.no_embed_class:
            return torch.cat(prefix + [x + pos_patch], dim=1)
        return torch.cat(prefix + [x], dim=1) + torch.cat([pos_prefix, pos_patch], dim=1)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int], Optional[Tensor]]:
        """Patch embedding, prefix tokens and positions, pre-norm; plus the rotary table (EVA)."""
        vit = self.vit
        x = vit.patch_embed(x)
        h, w = x.shape[1:3]
        x = vit.norm_pre(vit.pos_drop(self._add_pos_embed(x)))
        rope = getattr(vit, "rope", None)
        return x, (h, w), None if rope is None else rope.get_embed(shape=(h, w))

    def forward(self, x: Tensor) -> EncoderOutput:
        """x: normalised images (B, 3, H, W); the token grid is floor(H/p) x floor(W/p)."""
        vit = self.vit
        p = self.patch_size
        # Like a stride-p conv without padding: remainder rows/columns are dropped.
        x, (h, w), rope = self._embed(x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p])
        per_block_rope = getattr(vit, "rope_mixed", False)
        aux = None
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(vit.blocks):
            kwargs = {} if rope is None else {"rope": rope[i] if per_block_rope else rope}
            if checkpointed and x.requires_grad:
                # Recompute the block in backward instead of keeping its activations.
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
            if i == self.aux_index:
                aux = x
        x = vit.norm(x)  # timm's forward_features ends here
        summary = vit.forward_head(x, pre_logits=True) if vit.cls_token is None else None
        if self.norm_tokens_after_pooling:
            x = vit.fc_norm(x)
        n_prefix = vit.num_prefix_tokens

        def to_map(tokens: Tensor) -> Tensor:
            return tokens[:, n_prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

        cls = x[:, 0] if summary is None else summary
        return EncoderOutput(cls=cls, tokens=to_map(x), aux_tokens=to_map(aux))
