"""Shared CLI behaviour: user errors print one clear line and exit 2, without a traceback;
one argument parser and help layout for every entry point."""

from __future__ import annotations

import argparse
import re
import sys
import typing
from typing import Callable

from toco.errors import ConfigError, UserError

_LITERAL_PERCENT = re.compile(r"%(?![(%])")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except the None/False of flags whose help says what they do;
    descriptions and epilogs keep their line breaks (usage examples).

    A literal '%' in a help text ("~30% more compute") is escaped, so --help never fails on it.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = _LITERAL_PERCENT.sub("%%", action.help or "")
        if action.default is None or action.default is False:
            return text
        original, action.help = action.help, text
        try:
            return super()._get_help_string(action)
        finally:
            action.help = original


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (printed as one line by `run_cli`) instead of exiting 2
    with the usage text, and formats help with `HelpFormatter`."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _first_meaningful_line(err: BaseException) -> str:
    # Errors raised in DataLoader workers arrive wrapped with the worker's traceback text.
    text = str(err)
    if "Original Traceback" in text:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def run_cli(main: Callable[[], int]) -> int:
    try:
        return main()
    except UserError as err:
        print(f"error: {_first_meaningful_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
