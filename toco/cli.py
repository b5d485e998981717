"""Shared CLI behaviour: user errors print one clear line and exit 2, without a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from toco.errors import UserError


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
