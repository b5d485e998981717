"""Shared fixtures; the builders themselves live in tests/fixtures.py for reuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import make_standard_voc_tree


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """A tiny VOC tree in the true on-disk format (see tests.fixtures.standard_specs)."""
    return make_standard_voc_tree(tmp_path / "VOC2012")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
