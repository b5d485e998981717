"""Typed settings, declared once for the core config and for every plug-in.

A setting is a dataclass field made by `setting(...)`: its default, a help line, optional
choices, the element type of a tuple, the help group, and `before`: the value that reproduces
what runs did before the setting existed, for stored configs that predate it (a callable gets
the stored config, for settings whose old behaviour depended on another one), and
`renamed_from`: earlier names of the setting, still read from YAML, flags and stored configs
(one spelling per concept without breaking a recipe). The YAML key is the field name and the
flag the same with dashes; the helpers below read these fields, so the
core config (toco.config) and the plug-in section (toco.config.plugin_section) type values,
build flags, check choices and load old configs the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, Callable, Iterable, Mapping, Sequence

from toco.errors import ConfigError

_UNSET = object()


def setting(
    default: Any,
    help: str,
    choices: Sequence[Any] | None = None,
    group: str = "misc",
    *,
    elem: type | None = None,
    before: Any = _UNSET,
    internal: bool = False,
    renamed_from: Sequence[str] = (),
) -> Any:
    """A typed setting (a dataclass field); tuples get `elem` (default: the first item's type).

    `internal`: stored and read from YAML, but no flag of its own."""
    meta: dict[str, Any] = {
        "help": help,
        "group": group,
        "internal": internal,
        "renamed_from": tuple(renamed_from),
    }
    if choices is not None:
        meta["choices"] = tuple(choices)
    if before is not _UNSET:
        meta["before"] = before
    if isinstance(default, (list, tuple)):
        meta["elem"] = elem or (type(default[0]) if default else str)
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    """The settings of a settings dataclass, by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.cache
def _old_names(cls: type) -> dict[str, str]:
    return {
        old: name
        for name, f in fields_of(cls).items()
        for old in f.metadata.get("renamed_from", ())
    }


def current_name(cls: type, key: str) -> str:
    """The setting's name for `key`, which may be one of its earlier names (`renamed_from`)."""
    return _old_names(cls).get(key, key)


def old_names(cls: type, name: str) -> tuple[str, ...]:
    """The earlier names of a setting (its `renamed_from`)."""
    return fields_of(cls)[name].metadata.get("renamed_from", ())


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def value_type(cls: type, name: str) -> type:
    """The declared type of a setting, Optional[...] unwrapped (tuples: `tuple`)."""
    hint = _hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def accepts_none(cls: type, name: str) -> bool:
    return type(None) in typing.get_args(_hints(cls)[name])


def default_of(cls: type, name: str) -> Any:
    f = fields_of(cls)[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def convert(cls: type, name: str, value: Any, source: str, spelled: str | None = None) -> Any:
    """`value` as the setting's type; a value it cannot take raises one ConfigError naming
    `source` and the key as the user wrote it (`spelled`, default: the name)."""
    typ = value_type(cls, name)
    try:
        if value is None:
            if not accepts_none(cls, name):
                raise ValueError("a value is required")
            return None
        if typ is tuple:
            seq = value if isinstance(value, (list, tuple)) else [value]
            return tuple(fields_of(cls)[name].metadata["elem"](v) for v in seq)
        if typ is bool:
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        return typ(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: bad value {value!r} for '{spelled or name}': {err}") from None


def unknown_key(what: str, key: str, known: Iterable[str], source: str) -> ConfigError:
    """The error for a name that is not known, with the closest known names as a hint."""
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{source}: unknown {what} '{key}'{hint}")


def flag_options(cls: type, name: str) -> dict[str, Any]:
    """argparse keywords that type a non-boolean setting's flag (type, nargs, choices)."""
    f = fields_of(cls)[name]
    if value_type(cls, name) is tuple:
        return {"nargs": "+", "type": f.metadata["elem"]}
    options: dict[str, Any] = {"type": value_type(cls, name)}
    if "choices" in f.metadata:
        options["choices"] = f.metadata["choices"]
    return options


def check_choices(settings: Any, spell: Callable[[str], str]) -> None:
    """Every setting with choices holds one of them; `spell(name)` names it as the user sees it."""
    for name, f in fields_of(type(settings)).items():
        choices = f.metadata.get("choices")
        value = getattr(settings, name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{spell(name)}: '{value}' is not one of {list(choices)}")


def values_before(cls: type, stored: Mapping[str, Any], given: Iterable[str]) -> dict[str, Any]:
    """For a stored config that sets only `given`: the `before` value of every other setting
    that has one (what runs written before that setting existed did)."""
    given = set(given)
    out = {}
    for name, f in fields_of(cls).items():
        if "before" in f.metadata and name not in given:
            before = f.metadata["before"]
            out[name] = before(stored) if callable(before) else before
    return out
