"""The command line of train.py: one flag per setting (grouped as the settings declare), the
plug-in flags, `--config` and `--plugin-module`, parsed into a validated TrainConfig."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence

from toco import schema
from toco.cli import ArgumentParser
from toco.config.plugin_section import add_plugin_flags
from toco.config.recipes import display_path, load_recipe_chain, resolve_recipes, union_of_names
from toco.config.settings import FIELDS, OFFICIAL_BEHAVIOUR, TrainConfig
from toco.plugins.registry import MODULES_KEY, import_plugin_modules

ExtraFlags = Optional[Callable[[argparse.ArgumentParser], None]]  # adds a script's own flags


def build_parser(extra: ExtraFlags = None) -> argparse.ArgumentParser:
    """One flag per TrainConfig field, grouped; `extra(parser)` may add script-only flags."""
    parser = ArgumentParser(description="Train a ToCo-style single-stage WSSS model.")
    parser.add_argument("--config", help="YAML recipe whose values become the defaults")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        if f.metadata.get("internal"):
            continue
        group_name = f.metadata["group"]
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "help": f.metadata["help"],
            "dest": name,
            "default": argparse.SUPPRESS,
        }
        if schema.value_type(TrainConfig, name) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(schema.flag_options(TrainConfig, name))
        group.add_argument(flag, **kwargs)
        for old_name in schema.old_names(TrainConfig, name):  # earlier spellings still work
            group.add_argument(
                "--" + old_name.replace("_", "-"), **{**kwargs, "help": argparse.SUPPRESS}
            )
    _add_module_flag(groups.setdefault("plugins", parser.add_argument_group("plugins")))
    add_plugin_flags(parser)
    if extra is not None:
        extra(parser)
    return parser


def _add_module_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--plugin-module",
        dest=MODULES_KEY,
        action="append",
        default=argparse.SUPPRESS,
        metavar="MODULE",
        help=FIELDS[MODULES_KEY].metadata["help"],
    )


def parse_config(
    argv: Optional[Sequence[str]] = None, extra: ExtraFlags = None
) -> tuple[TrainConfig, argparse.Namespace]:
    """Parse flags (and the YAML named by --config) into a validated TrainConfig.

    Returns the config and the namespace (for script-only flags added by `extra`).
    """
    # The plug-in flags come from the registry, so the modules named by --plugin-module and by
    # the recipe chain are imported before the full parser is built.
    early = ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config")
    _add_module_flag(early)
    known, _ = early.parse_known_args(argv)
    import_plugin_modules(getattr(known, MODULES_KEY, ()), "--plugin-module")
    layers = load_recipe_chain(known.config) if known.config else []
    parser = build_parser(extra)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    values, chain, warnings = resolve_recipes(args.config, flags, layers)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if {**values, **flags}.get("reference_quirks"):
        values.update(OFFICIAL_BEHAVIOUR)
    flags[MODULES_KEY] = union_of_names(values.get(MODULES_KEY, ()), flags.get(MODULES_KEY, ()))
    values.update(flags)
    values["recipe"] = " + ".join(display_path(str(p)) for p in chain) or None
    return TrainConfig.from_dict(values, "command line"), args
