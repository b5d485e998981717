"""The `plugins` section of the config: the settings of every registered plug-in.

`PluginSet` holds one settings object per plug-in (`cfg.plugins.ppc.tau`); this module reads
the section from recipes (`plugins: {name: {setting: value}}`), from the plug-in flags and from
the flat keys of older recipes and checkpoints (`ppc`, `w_ppc`, `ppc_tau`, ...,
`plugin_start_iter` -> `plugins.ppc.enable`, `.weight`, `.tau`, ..., every plug-in's
`start_iter`; see `split_plugin_values`), types every value with toco.schema as the core
settings are, and builds the plug-in flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Optional

from toco import schema
from toco.errors import ConfigError
from toco.plugins.registry import MODULES_KEY, PluginSettings, import_plugin_modules, registered

if TYPE_CHECKING:  # annotations only: TrainConfig holds a PluginSet
    from toco.config.settings import TrainConfig

SECTION = "plugins"
ALL_START_KEY = "plugin_start_iter"  # flat key / flag setting every plug-in's start_iter


def _coerce_section(name: str, values: Any, source: str) -> dict[str, Any]:
    """One plug-in's section ({setting: value}, or a bare true/false for `enable`), typed."""
    plugin = registered()[name]
    if isinstance(values, bool):
        values = {"enable": values}
    if not isinstance(values, dict):
        raise ConfigError(
            f"{source}: '{SECTION}.{name}' must be a mapping of settings or "
            f"true/false, got {values!r}"
        )
    known = schema.fields_of(plugin.settings)
    out = {}
    for raw, value in values.items():
        key = schema.current_name(plugin.settings, str(raw).replace("-", "_"))
        if key not in known:
            raise schema.unknown_key(f"setting of plug-in {name}", key, known, source)
        out[key] = schema.convert(plugin.settings, key, value, source, f"{SECTION}.{name}.{raw}")
    return out


def split_plugin_values(
    values: dict[str, Any], source: str
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
            name, _, setting_name = key[len(SECTION) + 1 :].partition(".")
            if name not in plugins:
                raise schema.unknown_key("plug-in", name, plugins, source)
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
            setting_name = schema.current_name(plugins[owner].settings, key[len(owner) + 1 :])
            if setting_name not in schema.fields_of(plugins[owner].settings):
                raise ConfigError(
                    f"{source}: '{key}' is no longer a setting: plug-in settings live in the "
                    f"'{SECTION}.{owner}' section, which has no '{setting_name}' (known: "
                    f"{', '.join(schema.fields_of(plugins[owner].settings))})"
                )
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
            raise schema.unknown_key("plug-in", str(key), plugins, source)
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
            name, _, setting_name = key[len(SECTION) + 1 :].partition(".")
            nested.setdefault(name, {})[setting_name] = value
    return {**core, SECTION: nested} if nested else core


def merge_plugin_values(*layers: Optional[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Later layers override earlier ones, setting by setting."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, values in (layer or {}).items():
            out.setdefault(name, {}).update(values)
    return out


class PluginSet:
    """The settings of every registered plug-in: `plugins.ppc.tau`, `plugins["rca"]`."""

    def __init__(
        self, values: "Optional[dict[str, Any] | PluginSet]" = None, source: str = "config"
    ) -> None:
        given = dict(values._settings if isinstance(values, PluginSet) else values or {})
        plugins = registered()
        for name in given:
            if name not in plugins:
                raise schema.unknown_key("plug-in", name, plugins, source)
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
        return {
            n: {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self[n]).items()
            }
            for n in self.names()
        }

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
            schema.check_choices(
                settings, lambda s, n=name: f"{SECTION}.{n}.{s} (--{flag_name(n, s)})"
            )
            need(
                settings.weight >= 0, f"{SECTION}.{name}.weight must be >= 0, got {settings.weight}"
            )
            need(
                settings.start_iter is None or settings.start_iter >= 0,
                f"{SECTION}.{name}.start_iter must be >= 0, got {settings.start_iter}",
            )
            if settings.enable:
                settings.check(
                    cfg, need, lambda s, n=name: f"{SECTION}.{n}.{s} (--{flag_name(n, s)})"
                )


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
    parser.add_argument(
        "--" + ALL_START_KEY.replace("_", "-"),
        key=ALL_START_KEY,
        type=int,
        metavar="ITER",
        help="start_iter of every plug-in (a plug-in's own flag wins)",
        **common,
    )
    for name, plugin in registered().items():
        group = parser.add_argument_group(f"plug-in {name}", plugin.summary)
        for f in dataclasses.fields(plugin.settings):
            key = f"{SECTION}.{name}.{f.name}"
            flag = "--" + flag_name(name, f.name)
            typ = schema.value_type(plugin.settings, f.name)
            default = schema.default_of(plugin.settings, f.name)
            help_text = f"switch {name} on" if f.name == "enable" else f.metadata["help"]
            if typ is bool:
                group.add_argument(
                    flag,
                    key=key,
                    nargs=0,
                    const=True,
                    help=f"{help_text} (--no-{flag[2:]}: off; default: "
                    f"{'on' if default else 'off'})",
                    **common,
                )
                group.add_argument(
                    "--no-" + flag[2:],
                    key=key,
                    nargs=0,
                    const=False,
                    help=argparse.SUPPRESS,
                    **common,
                )
                continue
            for old_name in schema.old_names(plugin.settings, f.name):  # still accepted
                group.add_argument(
                    "--" + flag_name(name, old_name),
                    key=key,
                    help=argparse.SUPPRESS,
                    **common,
                    **schema.flag_options(plugin.settings, f.name),
                )
            flags = [flag, f"--w-{name}"] if f.name == "weight" else [flag]
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            choices = f.metadata.get("choices")
            kwargs: dict[str, Any] = {
                "key": key,
                "help": help_text if default is None else f"{help_text} (default: {shown})",
                "metavar": "{" + ",".join(map(str, choices)) + "}" if choices else f.name.upper(),
                **common,
                **schema.flag_options(plugin.settings, f.name),
            }
            group.add_argument(*flags, **kwargs)


def plugin_values_before(saved: dict[str, Any]) -> dict[str, Any]:
    """For a stored config: the plug-in settings it predates, at the values that reproduce how
    its run behaved (their `before`), as dotted keys to put under the stored values."""
    _, given = split_plugin_values(saved, "checkpoint config")
    return flatten_plugin_values(
        {
            name: schema.values_before(plugin.settings, saved, given.get(name, {}))
            for name, plugin in registered().items()
        }
    )


def enabled_in(config: dict[str, Any]) -> list[str]:
    """Plug-ins switched on in a stored config dict (new `plugins:` section or older flat keys)."""
    _, values = split_plugin_values(config, "checkpoint config")
    return [n for n in registered() if values.get(n, {}).get("enable", False)]
