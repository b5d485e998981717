"""Seed plug-ins on the single-stage pipeline: PPC, RCA and MCIS (design notes: docs/plugins.md).

A plug-in is one module that declares its typed settings and registers itself
(toco.plugins.registry). Its losses are `toco.method.step.LossModule`s: a plug-in has a `weight` and
a `start_iter`, receives the step's `StepState` (final / aux token maps and class token, image and
decoder logits, multi-scale CAMs, lazily computed pseudo labels, image labels, the iteration, and
the model for extra passes such as `state.rescaled_view`) and returns a dict of named, unweighted
losses; the engine multiplies them by `weight`. A loss module may also rewrite the CAM the pixel
pseudo labels are refined from (`LossModule.pseudo_label_cam`, MCIS's co-attention fusion). It may
own parameters (they join the optimizer's x10 head group) and persistent state as registered buffers
(saved with the trainer's `loss_modules` in the checkpoint). A plug-in that changes the network
(RCA's aggregation) does so in its `attach` builder, called by `build_model`, so training, the CAM
passes and inference all run it and its state ships with the model's state_dict.

    model = build_model(cfg, num_classes)            # calls attach_plugins(model, cfg, ...)
    plugins = build_plugins(cfg, model.backbone.embed_dim, num_classes, dist_info, model)
    trainer = Trainer(cfg, model, build_loss_modules(cfg) + plugins, device, dist_info)

With every plug-in off `build_plugins` returns [] and `attach_plugins` changes nothing, leaving
the pipeline exactly as without this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from toco.distributed import DistInfo
from toco.plugins.registry import (
    BuildContext,
    Plugin,
    PluginSettings,
    plugin_names,
    register,
    registered,
)

if TYPE_CHECKING:
    from torch import nn

    from toco.config.settings import TrainConfig
    from toco.method.step import LossModule


def enabled_plugins(cfg: "TrainConfig") -> list[str]:
    """Names of the plug-ins switched on in `cfg`, in registry order."""
    return cfg.plugins.enabled()


def attach_plugins(model: "nn.Module", cfg: "TrainConfig", num_classes: int) -> None:
    """Let the enabled plug-ins change the network (e.g. RCA's aggregation hook)."""
    for name in enabled_plugins(cfg):
        plugin = registered()[name]
        if plugin.attach is not None:
            plugin.attach(cfg.plugins[name], cfg, model, num_classes)


def build_plugins(
    cfg: "TrainConfig",
    embed_dim: int,
    num_classes: int,
    dist_info: DistInfo = DistInfo(),
    model: Optional["nn.Module"] = None,
) -> list["LossModule"]:
    """The loss modules of the enabled plug-ins, in registry order.

    `model`: the network built by `build_model` (plug-ins that attached parts to it, such as
    RCA's memory, share them with their loss modules).
    """
    ctx = BuildContext(cfg, embed_dim, num_classes, dist_info, model)
    modules: list = []
    for name in enabled_plugins(cfg):
        modules.extend(registered()[name].build_losses(cfg.plugins[name], ctx))
    return modules


def pair_policy(cfg: "TrainConfig") -> Optional[str]:
    """The pair-sampling policy of the run: `cfg.pair_sampler` when it is set (every run of an
    ablation on one data path), else the one an enabled plug-in (MCIS) wants, or None."""
    if cfg.pair_sampler != "auto":
        return cfg.pair_sampler
    for name in enabled_plugins(cfg):
        plugin = registered()[name]
        policy = plugin.pair_policy(cfg.plugins[name]) if plugin.pair_policy else None
        if policy is not None:
            return policy
    return None


__all__ = [
    "BuildContext",
    "Plugin",
    "PluginSettings",
    "attach_plugins",
    "build_plugins",
    "enabled_plugins",
    "pair_policy",
    "plugin_names",
    "register",
    "registered",
]
