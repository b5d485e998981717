"""The plug-in contract: each plug-in owns its typed settings and registers itself here.

A plug-in is one module that defines

- a `PluginSettings` subclass: its typed settings, declared with `setting` (toco.schema) like
  the core settings (the YAML section `plugins: {name: {...}}`, the flags `--name`,
  `--name-weight`, `--name-<setting>`), and its own checks in `check`;
- a `Plugin` record naming the settings class and its builders (loss modules; optionally network
  hooks and a pair-sampling policy), passed to `register`.

The core config holds one `plugins` field (toco.config.plugin_section: flags, YAML sections and
older flat keys for every registered plug-in); it knows no plug-in by name. The built-in plug-ins
are listed in BUILTIN_PLUGINS, the only line a new method adds outside its own module (a plug-in
defined elsewhere calls `register` itself, e.g. from a module named by `--plugin-module`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from toco.errors import ConfigError
from toco.schema import setting

__all__ = [
    "BUILTIN_PLUGINS",
    "MODULES_KEY",
    "BuildContext",
    "Plugin",
    "PluginSettings",
    "import_plugin_modules",
    "plugin_names",
    "register",
    "registered",
    "setting",
    "unregister",
]

if TYPE_CHECKING:  # only for annotations: the core config imports this module
    from torch import nn

    from toco.config.settings import TrainConfig
    from toco.distributed import DistInfo
    from toco.method.step import LossModule

# The registry line: modules whose import registers a built-in plug-in, in build order.
BUILTIN_PLUGINS: tuple[str, ...] = ("toco.plugins.ppc", "toco.plugins.rca", "toco.plugins.mcis")

MODULES_KEY = "plugin_modules"  # user modules imported before any plug-in setting is read


@dataclass
class PluginSettings:
    """Settings every plug-in has; subclasses add theirs (with `setting`, toco.schema: a setting
    added after checkpoints were written whose default changes what a run does names the value
    that reproduces the older behaviour, `before=`) and override `check`."""

    enable: bool = setting(False, "switch the plug-in on")
    weight: float = setting(0.1, "weight of the plug-in's losses")
    start_iter: Optional[int] = setting(
        None, "iteration where its losses switch on (default: seg_start_iter)"
    )

    def start(self, cfg: "TrainConfig") -> int:
        """The first iteration of the plug-in's losses."""
        return cfg.seg_start_iter if self.start_iter is None else self.start_iter

    def check(self, cfg: "TrainConfig", need: Callable[[bool, str], None], key: str) -> None:
        """Cross-field checks of the plug-in (only called when it is on, after the generic
        type/choice checks). `key(name)` spells a setting as the user sees it."""


@dataclass(frozen=True)
class BuildContext:
    """What a plug-in's builders get besides its settings."""

    cfg: "TrainConfig"
    embed_dim: int
    num_classes: int
    dist_info: "DistInfo"
    model: Optional["nn.Module"] = None


@dataclass(frozen=True)
class Plugin:
    """A registered plug-in.

    Attributes:
        name: YAML section and flag prefix (a Python identifier).
        settings: its PluginSettings subclass.
        summary: one line for `--name`'s help.
        build_losses: (settings, ctx) -> loss modules (parameters and buffers allowed).
        attach: (settings, cfg, model, num_classes) -> None; changes the network itself
            (e.g. a feature hook run in every encoder pass), called by build_model.
        pair_policy: settings -> sampling policy name when the plug-in needs each per-device
            batch made of image pairs (toco.train.sampling.PairedResumableSampler), else None.
    """

    name: str
    settings: type[PluginSettings]
    summary: str
    build_losses: Callable[[PluginSettings, BuildContext], list["LossModule"]]
    attach: Optional[Callable[[PluginSettings, "TrainConfig", "nn.Module", int], None]] = None
    pair_policy: Optional[Callable[[PluginSettings], Optional[str]]] = None


_REGISTRY: dict[str, Plugin] = {}
_builtins_loaded = False


def register(plugin: Plugin) -> Plugin:
    """Add a plug-in (a second registration under the same name replaces the first)."""
    if not plugin.name.isidentifier():
        raise ValueError(f"plug-in name {plugin.name!r} is not an identifier")
    if not issubclass(plugin.settings, PluginSettings):
        raise TypeError(f"{plugin.name}: settings must subclass PluginSettings")
    _REGISTRY[plugin.name] = plugin
    return plugin


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> dict[str, Plugin]:
    """Every registered plug-in, built-ins first (imported on first use)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_PLUGINS:
            importlib.import_module(module)
    # Built-ins in BUILTIN_PLUGINS order whatever was imported first, then the others.
    rank = {m.rsplit(".", 1)[-1]: i for i, m in enumerate(BUILTIN_PLUGINS)}
    order = sorted(_REGISTRY, key=lambda n: rank.get(n, len(rank)))  # stable: others in order
    return {n: _REGISTRY[n] for n in order}


def plugin_names() -> tuple[str, ...]:
    return tuple(registered())


def import_plugin_modules(modules: Any, source: str) -> tuple[str, ...]:
    """Import user modules that register plug-ins (`--plugin-module`, `plugin_modules:`).

    `modules`: a module name or a list of them. Returns the names as a tuple. A name that is
    not a dotted identifier, or a module whose import fails, raises one ConfigError naming it.
    """
    names = (modules,) if isinstance(modules, str) else tuple(modules or ())
    for name in names:
        if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
            raise ConfigError(
                f"{source}: {MODULES_KEY}: {name!r} is not a module name (e.g. my_pkg.my_loss)"
            )
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure of user code is reported alike
            detail = str(err).splitlines()[0] if str(err) else ""
            missing = isinstance(err, ModuleNotFoundError) and f"{name}.".startswith(f"{err.name}.")
            hint = " (is its folder on PYTHONPATH?)" if missing else ""
            raise ConfigError(
                f"{source}: plug-in module '{name}' cannot be imported: "
                f"{type(err).__name__}: {detail}{hint}"
            ) from None
    return names
