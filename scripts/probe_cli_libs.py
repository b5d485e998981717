"""What jsonargparse or tyro would make of the training settings (the measurement behind
docs/layout.md's "Why the settings are declared here").

    pip install jsonargparse tyro        # not requirements of the project
    python -m scripts.probe_cli_libs --library jsonargparse
    python -m scripts.probe_cli_libs --library tyro

Builds each library's parser from the dataclasses the project already has (`TrainConfig`'s
fields as `core`, PPC's settings as a nested `ppc`), then prints: the import time, the number
of flags in its help, the spelling it gives a few known settings, and what happens to today's
flags, to a malformed value and to a value outside a setting's declared choices (exit code,
number of lines printed, last line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import time
from typing import Any

from toco.cli import ArgumentParser, run_cli

PROBES = (
    ["--crop-size", "320"],
    ["--core.crop-size", "320"],
    ["--core.crop_size", "320"],
    ["--ppc-tau", "0.2"],
    ["--ppc.tau", "0.2"],
    ["--core.lr", "fast"],
    ["--core.amp", "bf17"],
)


def probe_types() -> type:
    """A dataclass with the core settings (`core`, plug-ins left out) and PPC's (`ppc`)."""
    from toco.config.settings import TrainConfig
    from toco.plugins.ppc import PPCSettings

    def copy(f: dataclasses.Field) -> Any:
        if f.default is not dataclasses.MISSING:
            return dataclasses.field(default=f.default)
        return dataclasses.field(default_factory=f.default_factory)

    core = dataclasses.make_dataclass(
        "Core",
        [(f.name, f.type, copy(f)) for f in dataclasses.fields(TrainConfig) if f.name != "plugins"],
    )
    core.__module__ = TrainConfig.__module__  # resolve the string annotations there
    return dataclasses.make_dataclass(
        "Probe",
        [
            ("core", core, dataclasses.field(default_factory=core)),
            ("ppc", PPCSettings, dataclasses.field(default_factory=PPCSettings)),
        ],
    )


def parse_with(library: Any, name: str, probe: type, argv: list[str]) -> tuple[Any, str]:
    """(exit code or exception, everything printed) of one parse."""
    printed = io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            if name == "jsonargparse":
                parser = library.ArgumentParser()
                parser.add_class_arguments(probe)
                parser.parse_args(argv)
            else:
                library.cli(probe, args=argv)
        except SystemExit as stop:
            code = stop.code
        except Exception as err:  # noqa: BLE001 - reported as the probe's result
            code = f"{type(err).__name__}: {err}"
    return code, printed.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", choices=["jsonargparse", "tyro"], required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        library = importlib.import_module(args.library)
    except ImportError:
        raise SystemExit(f"{args.library} is not installed (pip install {args.library})") from None
    imported = time.perf_counter() - start
    probe = probe_types()
    _, help_text = parse_with(library, args.library, probe, ["--help"])
    flags = sorted({t.split("=")[0].strip(",[]") for t in help_text.split() if t.startswith("--")})
    known = [f for f in flags if f.endswith(("crop-size", "crop_size", ".tau", ".enable"))]
    print(
        f"{args.library} {getattr(library, '__version__', '?')}: import {imported:.2f} s, "
        f"{len(flags)} flags in --help, e.g. {', '.join(known)}"
    )
    for probe_argv in PROBES:
        code, printed = parse_with(library, args.library, probe, probe_argv)
        lines = [line for line in printed.splitlines() if line.strip()]
        last = lines[-1].strip()[:100] if lines else ""
        print(f"  {' '.join(probe_argv):24s} exit {code}, {len(lines)} line(s) printed: {last}")


if __name__ == "__main__":
    run_cli(main)
