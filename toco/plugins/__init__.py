"""Seed plug-ins on the single-stage pipeline: PPC, RCA and MCIS (docs: seeds_spec.md).

The plug-in interface is ToCo's own `toco.step.LossModule`: a plug-in has a `weight` and a
`start_iter`, receives the step's `StepState` (final / aux token maps and class token, image and
decoder logits, multi-scale CAMs, lazily computed pseudo labels, image labels, the iteration,
and the model for extra passes such as `state.rescaled_view`) and returns a dict of named,
unweighted losses; the engine multiplies them by `weight`. A plug-in may own parameters (they
join the optimizer's x10 head group) and persistent state as registered buffers (saved with the
trainer's `loss_modules` in the checkpoint). A plug-in that changes the features every encoder
pass sees adds a feature hook to the network (`model.feature_hooks`, built by `build_model`
through `build_feature_hooks`), so training, the CAM passes and inference all run it, and its
state ships with the model's state_dict.

    model = build_model(cfg, num_classes)            # attaches build_feature_hooks(cfg, ...)
    plugins = build_plugins(cfg, model.backbone.embed_dim, num_classes, dist_info, model)
    trainer = Trainer(cfg, model, build_loss_modules(cfg) + plugins, device, dist_info)

Any subset of --ppc, --rca, --mcis can be on; with all off `build_plugins` returns [] and
`build_feature_hooks` returns [], leaving the pipeline exactly as without this package.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from toco.config import TrainConfig
from toco.distributed import DistInfo
from toco.plugins.mcis import CrossImageSemantics, build_mcis
from toco.plugins.ppc import PixelPrototypeContrast, build_ppc
from toco.plugins.rca import RCAAggregation, RCAMemory, RegionalContrast, build_rca, \
    build_rca_hook
from toco.step import LossModule

PLUGIN_NAMES: tuple[str, ...] = ("ppc", "rca", "mcis")


def enabled_plugins(cfg: TrainConfig) -> list[str]:
    """Names of the plug-ins switched on in `cfg`, in PLUGIN_NAMES order."""
    return [name for name in PLUGIN_NAMES if getattr(cfg, name)]


def build_feature_hooks(cfg: TrainConfig, embed_dim: int, num_classes: int) -> list[nn.Module]:
    """The network feature hooks of the enabled plug-ins (RCA's aggregation), in order."""
    hook = build_rca_hook(cfg, embed_dim, num_classes)
    return [] if hook is None else [hook]


def _find_hook(model: Optional[nn.Module], kind: type) -> Optional[nn.Module]:
    if model is None:
        return None
    return next((h for h in getattr(model, "feature_hooks", ()) if isinstance(h, kind)), None)


def build_plugins(cfg: TrainConfig, embed_dim: int, num_classes: int,
                  dist_info: DistInfo = DistInfo(), model: Optional[nn.Module] = None
                  ) -> list[LossModule]:
    """The loss modules of the enabled plug-ins (PPC, RCA, MCIS order).

    `model`: the network built by `build_model`; RCA's loss module then shares the memory of
    the network's RCAAggregation hook (the hook reads the centroids the module computes). Without
    it (or with the aggregation off) RCA owns a memory of its own.
    """
    builders: dict[str, Callable[[], LossModule]] = {
        "ppc": lambda: build_ppc(cfg, embed_dim, num_classes, dist_info),
        "rca": lambda: build_rca(cfg, embed_dim, num_classes, dist_info,
                                 memory=_hook_memory(model, cfg)),
        "mcis": lambda: build_mcis(cfg, embed_dim, num_classes),
    }
    return [builders[name]() for name in enabled_plugins(cfg)]


def _hook_memory(model: Optional[nn.Module], cfg: TrainConfig) -> Optional[RCAMemory]:
    hook = _find_hook(model, RCAAggregation)
    if cfg.rca_aggregation and model is not None and hook is None:
        raise RuntimeError("--rca-aggregation is on but the model has no RCAAggregation hook "
                           "(build it with toco.builders.build_model)")
    return None if hook is None else hook.memory


__all__ = ["PLUGIN_NAMES", "build_plugins", "build_feature_hooks", "enabled_plugins",
           "PixelPrototypeContrast", "RegionalContrast", "RCAAggregation", "RCAMemory",
           "CrossImageSemantics"]
