"""A timm ViT/DeiT as ToCo's encoder: class token, final patch tokens and pre-norm aux tokens."""
from __future__ import annotations

import difflib
import os
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toco.errors import ConfigError, UserError


class EncoderOutput(NamedTuple):
    """What the encoder hands on: `cls` (B, D), `tokens` and `aux_tokens` as (B, D, h, w) maps."""

    cls: Tensor
    tokens: Tensor
    aux_tokens: Tensor


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int], new_grid: tuple[int, int],
                     antialias: bool = False) -> Tensor:
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
    table = F.interpolate(table, size=new_grid, mode="bicubic", align_corners=False,
                          antialias=antialias)
    return table.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)


def _unknown_backbone(name: str) -> ConfigError:
    candidates = timm.list_models("*vit*") + timm.list_models("*deit*")
    close = difflib.get_close_matches(name.split(".")[0], candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown backbone '{name}': not a timm model name.{hint}")


def create_vit(name: str, pretrained: str = "none", **kwargs) -> nn.Module:
    """Build a timm VisionTransformer by name, with weights from `pretrained`.

    `pretrained` is 'none' (random init), 'timm' (timm's own weights, from the hub or its cache),
    or a path to a local checkpoint (.pth/.bin/.safetensors with timm's key names).
    A missing file or an unreachable hub is an error: never a silent random init.
    """
    if not timm.is_model(name):
        raise _unknown_backbone(name)
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
            raise UserError(f"--pretrained: no such file '{pretrained}' (use 'none', 'timm' or "
                            "a path to a checkpoint)")
        try:
            model = timm.create_model(name, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=pretrained), **kwargs)
        except Exception as err:
            raise UserError(f"could not load backbone weights from '{pretrained}' into "
                            f"'{name}': {type(err).__name__}: {err}") from None
    if getattr(model, "cls_token", None) is None or not hasattr(model, "blocks"):
        raise ConfigError(f"backbone '{name}' is not a ViT with a class token; ToCo needs one")
    return model


class ViTBackbone(nn.Module):
    """timm ViT run block by block, returning ToCo's three outputs.

    Args:
        name: timm model name, e.g. 'deit_base_patch16_224.fb_in1k'.
        pretrained: 'none', 'timm' or a checkpoint path (see `create_vit`).
        aux_layer: index into the blocks whose raw (pre-norm) output gives the aux tokens;
            -3 is the 10th of 12 blocks, as in ToCo.
        freeze_pos_embed: ToCo never trains the position table.
        **kwargs: passed to `timm.create_model` (e.g. depth=6 for a shallower test model).
    """

    def __init__(self, name: str, pretrained: str = "none", aux_layer: int = -3,
                 freeze_pos_embed: bool = True, **kwargs) -> None:
        super().__init__()
        self.vit = create_vit(name, pretrained, **kwargs)
        depth = len(self.vit.blocks)
        if not -depth <= aux_layer < depth:
            raise ConfigError(f"aux_layer {aux_layer} out of range for a {depth}-block backbone")
        self.aux_index = aux_layer % depth
        self.embed_dim: int = self.vit.embed_dim
        self.patch_size: int = self.vit.patch_embed.patch_size[0]
        if self.vit.pos_embed is not None and freeze_pos_embed:
            self.vit.pos_embed.requires_grad_(False)

    def _add_pos_embed(self, x: Tensor) -> Tensor:
        """x: (B, h, w, D) patch embeddings → (B, prefix + h*w, D) with positions added."""
        vit = self.vit
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        prefix = [vit.cls_token.expand(b, -1, -1)]
        if getattr(vit, "reg_token", None) is not None:
            prefix.append(vit.reg_token.expand(b, -1, -1))
        if vit.pos_embed is None:
            return torch.cat(prefix + [x], dim=1)
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos_prefix, pos_patch = vit.pos_embed[:, :n_prefix], vit.pos_embed[:, n_prefix:]
        pos_patch = resize_pos_embed(pos_patch, vit.patch_embed.grid_size, (h, w))
        if vit.no_embed_class:
            return torch.cat(prefix + [x + pos_patch], dim=1)
        return torch.cat(prefix + [x], dim=1) + torch.cat([pos_prefix, pos_patch], dim=1)

    def forward(self, x: Tensor) -> EncoderOutput:
        """x: normalised images (B, 3, H, W); the token grid is floor(H/p) x floor(W/p)."""
        vit = self.vit
        p = self.patch_size
        # Like a stride-p conv without padding: remainder rows/columns are dropped.
        x = vit.patch_embed(x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p])
        h, w = x.shape[1:3]
        x = vit.norm_pre(vit.pos_drop(self._add_pos_embed(x)))
        aux = None
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i == self.aux_index:
                aux = x
        x = vit.norm(x)
        n_prefix = vit.num_prefix_tokens

        def to_map(tokens: Tensor) -> Tensor:
            return tokens[:, n_prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

        return EncoderOutput(cls=x[:, 0], tokens=to_map(x), aux_tokens=to_map(aux))
