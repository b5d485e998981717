"""The plug-in registry: each plug-in owns its typed settings and registers itself here.

A plug-in is one module that defines

- a `PluginSettings` subclass: its typed settings (the YAML section `plugins: {name: {...}}`,
  the flags `--name`, `--name-weight`, `--name-<setting>`, and its own checks in `check`);
- a `Plugin` record naming the settings class and its builders (loss modules; optionally network
  hooks and a pair-sampling policy), passed to `register`.

The core config (toco.config.TrainConfig) holds one `plugins` field, a `PluginSet` of the settings
of every registered plug-in, and asks this module for flags, YAML sections and validation; it
knows no plug-in by name. The built-in plug-ins are listed in BUILTIN_PLUGINS, the only line a
new method adds outside its own module (a plug-in defined elsewhere, e.g. in a test, calls
`register` itself before the config is parsed).

Recipes and checkpoints written before the settings moved keep loading: the flat keys `ppc`,
`w_ppc`, `ppc_tau`, ..., `plugin_start_iter` map to `plugins.ppc.enable`, `.weight`, `.tau`,
..., and every plug-in's `start_iter` (see `split_plugin_values`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Optional, Sequence

from toco.errors import ConfigError

if TYPE_CHECKING:  # only for annotations: the core config imports this module
    from torch import nn

    from toco.config import TrainConfig
    from toco.distributed import DistInfo
    from toco.method.step import LossModule

# The registry line: modules whose import registers a built-in plug-in, in build order.
BUILTIN_PLUGINS: tuple[str, ...] = ("toco.plugins.ppc", "toco.plugins.rca", "toco.plugins.mcis")

SECTION = "plugins"
ALL_START_KEY = "plugin_start_iter"  # flat key / flag setting every plug-in's start_iter
MODULES_KEY = "plugin_modules"  # user modules imported before any plug-in setting is read


def setting(default: Any, help: str, choices: Sequence[Any] | None = None,
            elem: type | None = None):
    """A typed plug-in setting: default, help line, optional choices (tuples: element type)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, tuple)):
        meta["elem"] = elem or (type(default[0]) if default else str)
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PluginSettings:
    """Settings every plug-in has; subclasses add theirs (with `setting`) and override `check`.

    `before`: for settings added after checkpoints were written whose default changes what a run
    does, the value that reproduces the older behaviour (see `behaviour_before_settings`)."""

    before: ClassVar[dict[str, Any]] = {}

    enable: bool = setting(False, "switch the plug-in on")
    weight: float = setting(0.1, "weight of the plug-in's losses")
    start_iter: Optional[int] = setting(None, "iteration where its losses switch on "
                                              "(default: seg_start_iter)")

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
            raise ConfigError(f"{source}: {MODULES_KEY}: {name!r} is not a module name "
                              "(e.g. my_pkg.my_loss)")
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure of user code is reported alike
            detail = str(err).splitlines()[0] if str(err) else ""
            missing = (isinstance(err, ModuleNotFoundError)
                       and f"{name}.".startswith(f"{err.name}."))
            hint = " (is its folder on PYTHONPATH?)" if missing else ""
            raise ConfigError(f"{source}: plug-in module '{name}' cannot be imported: "
                              f"{type(err).__name__}: {detail}{hint}") from None
    return names


# ---- typed values -----------------------------------------------------------------------------
def _fields(cls: type[PluginSettings]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _scalar_type(cls: type[PluginSettings], name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def _convert(cls: type[PluginSettings], name: str, value: Any, where: str) -> Any:
    typ = _scalar_type(cls, name)
    try:
        if value is None:
            if type(None) not in typing.get_args(typing.get_type_hints(cls)[name]):
                raise ValueError("a value is required")
            return None
        if typ is tuple:
            seq = value if isinstance(value, (list, tuple)) else [value]
            return tuple(_fields(cls)[name].metadata["elem"](v) for v in seq)
        if typ is bool:
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        return typ(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: bad value {value!r}: {err}") from None


def _unknown(what: str, key: str, known: Iterable[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{source}: unknown {what} '{key}'{hint}")


def _coerce_section(name: str, values: Any, source: str) -> dict[str, Any]:
    """One plug-in's section ({setting: value}, or a bare true/false for `enable`), typed."""
    plugin = registered()[name]
    if isinstance(values, bool):
        values = {"enable": values}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{SECTION}.{name}' must be a mapping of settings or "
                          f"true/false, got {values!r}")
    known = _fields(plugin.settings)
    out = {}
    for raw, value in values.items():
        key = str(raw).replace("-", "_")
        if key not in known:
            raise _unknown(f"setting of plug-in {name}", key, known, source)
        out[key] = _convert(plugin.settings, key, value, f"{source}: {SECTION}.{name}.{key}")
    return out


def split_plugin_values(values: dict[str, Any], source: str
                        ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split a mapping of settings into (the core keys, the typed plug-in values
    {name: {setting: value}}).

    Plug-in values come from the `plugins:` section ({name: {setting: value}}), from dotted keys
    `plugins.<name>.<setting>` (how parsed layers are merged, see `flatten_plugin_values`), and
    from the flat keys of older recipes and checkpoints: `<name>` (enable), `w_<name>` (weight),
    `<name>_<setting>`, and `plugin_start_iter` (every plug-in's start_iter; within one mapping a
    plug-in's own start_iter wins). Later keys override earlier ones. A flat key that looks like
    a plug-in setting but is none raises ConfigError naming it.

    A mapping that names `plugin_modules` has them imported first: its plug-in keys can only be
    read once those modules have registered their plug-ins.
    """
    for raw, value in values.items():
        if str(raw).replace("-", "_") == MODULES_KEY:
            import_plugin_modules(value, source)
    plugins = registered()
    core: dict[str, Any] = {}
    common: dict[str, dict[str, Any]] = {}
    ordered: list[dict[str, dict[str, Any]]] = []
    for raw, value in values.items():
        key = str(raw).replace("-", "_")
        if key == SECTION:
            ordered.append(_section_values(value, source))
        elif key == ALL_START_KEY:
            common = {n: _coerce_section(n, {"start_iter": value}, source) for n in plugins}
        elif key.startswith(SECTION + "."):
            name, _, setting_name = key[len(SECTION) + 1:].partition(".")
            if name not in plugins:
                raise _unknown("plug-in", name, plugins, source)
            ordered.append({name: _coerce_section(name, {setting_name: value}, source)})
        elif key in plugins:
            ordered.append({key: _coerce_section(key, {"enable": value}, source)})
        elif key.startswith("w_") and key[2:] in plugins:
            ordered.append({key[2:]: _coerce_section(key[2:], {"weight": value}, source)})
        else:
            owner = next((n for n in plugins if key.startswith(n + "_")), None)
            if owner is None:
                core[raw] = value
                continue
            setting_name = key[len(owner) + 1:]
            if setting_name not in _fields(plugins[owner].settings):
                raise ConfigError(
                    f"{source}: '{key}' is no longer a setting: plug-in settings live in the "
                    f"'{SECTION}.{owner}' section, which has no '{setting_name}' (known: "
                    f"{', '.join(_fields(plugins[owner].settings))})")
            ordered.append({owner: _coerce_section(owner, {setting_name: value}, source)})
    return core, merge_plugin_values(common, *ordered)


def _section_values(value: Any, source: str) -> dict[str, dict[str, Any]]:
    """The `plugins` entry: {name: settings} (a recipe) or the keys the plug-in flags set."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{SECTION}' must map plug-in names to settings")
    plugins = registered()
    named = {k: v for k, v in value.items() if k in plugins}
    others = {k: v for k, v in value.items() if k not in plugins}
    for key in others:
        if not (key == ALL_START_KEY or str(key).startswith(SECTION + ".")):
            raise _unknown("plug-in", str(key), plugins, source)
    out = split_plugin_values(others, source)[1] if others else {}
    return merge_plugin_values(out, {n: _coerce_section(n, v, source) for n, v in named.items()})


def flatten_plugin_values(values: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{name: {setting: value}} -> {'plugins.<name>.<setting>': value}: parsed layers (dataset
    recipe, --config recipe, flags) then merge setting by setting with a plain dict update."""
    return {f"{SECTION}.{n}.{k}": v for n, sub in values.items() for k, v in sub.items()}


def nest_plugin_values(values: dict[str, Any]) -> dict[str, Any]:
    """The inverse for the constructor: dotted keys gathered into {'plugins': {name: {...}}}."""
    core = {k: v for k, v in values.items() if not str(k).startswith(SECTION + ".")}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if str(key).startswith(SECTION + "."):
            name, _, setting_name = key[len(SECTION) + 1:].partition(".")
            nested.setdefault(name, {})[setting_name] = value
    return {**core, SECTION: nested} if nested else core


def merge_plugin_values(*layers: Optional[dict[str, dict[str, Any]]]
                        ) -> dict[str, dict[str, Any]]:
    """Later layers override earlier ones, setting by setting."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, values in (layer or {}).items():
            out.setdefault(name, {}).update(values)
    return out


class PluginSet:
    """The settings of every registered plug-in: `plugins.ppc.tau`, `plugins["rca"]`."""

    def __init__(self, values: "Optional[dict[str, Any] | PluginSet]" = None,
                 source: str = "config") -> None:
        given = dict(values._settings if isinstance(values, PluginSet) else values or {})
        plugins = registered()
        for name in given:
            if name not in plugins:
                raise _unknown("plug-in", name, plugins, source)
        self._settings: dict[str, PluginSettings] = {}
        for name, plugin in plugins.items():
            value = given.get(name, {})
            if isinstance(value, PluginSettings):
                self._settings[name] = dataclasses.replace(value)
            else:
                self._settings[name] = plugin.settings(**_coerce_section(name, value, source))

    def __getitem__(self, name: str) -> PluginSettings:
        if name not in self._settings and name in registered():  # registered after creation
            self._settings[name] = registered()[name].settings()
        if name not in self._settings:
            raise KeyError(name)
        return self._settings[name]

    def __getattr__(self, name: str) -> PluginSettings:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no plug-in named {name!r}") from None

    def names(self) -> list[str]:
        """Every registered plug-in (one registered after this set was made gets defaults)."""
        return list(registered())

    def enabled(self) -> list[str]:
        """Names of the plug-ins switched on, in registry order."""
        return [n for n in self.names() if self[n].enable]

    def first_start(self, cfg: "TrainConfig") -> int:
        """The earliest start iteration of any plug-in, on or off (a common timing window)."""
        return min((self[n].start(cfg) for n in self.names()), default=cfg.seg_start_iter)

    def with_enabled(self, names: Iterable[str]) -> "PluginSet":
        """A copy with exactly `names` switched on."""
        on = set(names)
        return PluginSet({n: dataclasses.replace(self[n], enable=n in on) for n in self.names()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {n: {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(self[n]).items()} for n in self.names()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PluginSet) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"PluginSet({self.to_dict()})"

    def __deepcopy__(self, memo: dict) -> "PluginSet":
        return PluginSet(self.to_dict())

    def validate(self, cfg: "TrainConfig") -> None:
        """Generic choice checks for every plug-in, then each enabled plug-in's `check`."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in self.names():
            settings = self[name]
            for f in dataclasses.fields(settings):
                choices = f.metadata.get("choices")
                value = getattr(settings, f.name)
                need(choices is None or value in choices,
                     f"{SECTION}.{name}.{f.name} (--{flag_name(name, f.name)}): '{value}' is "
                     f"not one of {list(choices or [])}")
            need(settings.weight >= 0,
                 f"{SECTION}.{name}.weight must be >= 0, got {settings.weight}")
            need(settings.start_iter is None or settings.start_iter >= 0,
                 f"{SECTION}.{name}.start_iter must be >= 0, got {settings.start_iter}")
            if settings.enable:
                settings.check(cfg, need, lambda s, n=name: f"{SECTION}.{n}.{s} "
                               f"(--{flag_name(n, s)})")


# ---- command line ----------------------------------------------------------------------------
def flag_name(plugin: str, name: str) -> str:
    """`enable` -> 'ppc', others -> 'ppc-<setting>' (dashes)."""
    return plugin if name == "enable" else f"{plugin}-{name}".replace("_", "-")


class _PluginFlag(argparse.Action):
    """Stores `key: value` into the namespace's `plugins` dict (one dest for all plug-in flags,
    so the core parser passes them on as the `plugins` setting)."""

    def __init__(self, option_strings: list[str], dest: str, key: str = "", **kwargs) -> None:
        self.key = key
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = dict(getattr(namespace, self.dest, None) or {})
        given[self.key] = self.const if self.nargs == 0 else values
        setattr(namespace, self.dest, given)


def add_plugin_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of every registered plug-in (`--name`/`--no-name` for `enable`,
    `--name-<setting>`, also `--w-<name>` for the weight) and `--plugin-start-iter` for all."""
    common = {"dest": SECTION, "action": _PluginFlag, "default": argparse.SUPPRESS}
    parser.add_argument("--" + ALL_START_KEY.replace("_", "-"), key=ALL_START_KEY, type=int,
                        metavar="ITER",
                        help="start_iter of every plug-in (a plug-in's own flag wins)",
                        **common)
    for name, plugin in registered().items():
        group = parser.add_argument_group(f"plug-in {name}", plugin.summary)
        for f in dataclasses.fields(plugin.settings):
            key = f"{SECTION}.{name}.{f.name}"
            flag = "--" + flag_name(name, f.name)
            typ = _scalar_type(plugin.settings, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = (f"switch {name} on" if f.name == "enable" else f.metadata["help"])
            if typ is bool:
                group.add_argument(flag, key=key, nargs=0, const=True,
                                   help=f"{help_text} (--no-{flag[2:]}: off; default: "
                                   f"{'on' if default else 'off'})", **common)
                group.add_argument("--no-" + flag[2:], key=key, nargs=0, const=False,
                                   help=argparse.SUPPRESS, **common)
                continue
            flags = [flag, f"--w-{name}"] if f.name == "weight" else [flag]
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            choices = f.metadata.get("choices")
            kwargs: dict[str, Any] = {
                "key": key, "help": help_text if default is None
                else f"{help_text} (default: {shown})",
                "metavar": "{" + ",".join(map(str, choices)) + "}" if choices
                else f.name.upper(), **common}
            if typ is tuple:
                kwargs.update(nargs="+", type=f.metadata["elem"])
            else:
                kwargs["type"] = typ
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
            group.add_argument(*flags, **kwargs)


def behaviour_before_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """For a stored config: the plug-in settings it predates, at the values that reproduce how
    its run behaved (each plug-in's `before`), as dotted keys to put under the stored values."""
    _, given = split_plugin_values(saved, "checkpoint config")
    return {f"{SECTION}.{name}.{key}": value for name, plugin in registered().items()
            for key, value in plugin.settings.before.items() if key not in given.get(name, {})}


def enabled_in(config: dict[str, Any]) -> list[str]:
    """Plug-ins switched on in a stored config dict (new `plugins:` section or older flat keys)."""
    _, values = split_plugin_values(config, "checkpoint config")
    return [n for n in registered() if values.get(n, {}).get("enable", False)]
