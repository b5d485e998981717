"""pyproject.toml: the console scripts resolve to callables, the packages it lists are the
project's, and its dependencies are requirements.txt's (the test tools are the [dev] extra)."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower()


@pytest.mark.parametrize("script", ["wsss-train", "wsss-evaluate", "wsss-predict"])
def test_console_scripts_resolve_to_callables(script, monkeypatch, capsys):
    module_name, _, attr = PROJECT["scripts"][script].partition(":")
    assert module_name in SETUPTOOLS["py-modules"]
    entry = getattr(importlib.import_module(module_name), attr)
    assert callable(entry)
    # The entry point reads sys.argv as the console script does; bad flags are one line, rc 2.
    monkeypatch.setattr("sys.argv", [script, "--no-such-flag"])
    assert entry() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_dependencies_are_requirements_txt():
    lines = [
        ln.split("#", 1)[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
    ]
    required = {ln for ln in lines if ln}
    declared = set(PROJECT["dependencies"])
    dev = PROJECT["optional-dependencies"]["dev"]
    assert required - declared == {d for d in dev if requirement_name(d) != "ruff"}
    assert declared <= required


def test_listed_packages_are_the_project_packages():
    patterns = SETUPTOOLS["packages"]["find"]["include"]
    packages = {
        p.parent.relative_to(ROOT).as_posix().replace("/", ".")
        for top in ("toco", "models", "datasets")
        for p in (ROOT / top).rglob("__init__.py")
    }
    for package in packages:
        assert any(
            package == pat or (pat.endswith("*") and package.startswith(pat[:-1]))
            for pat in patterns
        ), package
