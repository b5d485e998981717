"""Provenance of an evaluation: enough to trace any number back to how it was made."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """The git commit (and whether tracked files differ from it), else the package version."""
    commit = _git("rev-parse", "HEAD")
    if commit:
        return {
            "git_commit": commit,
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        }
    try:
        return {"package_version": metadata.version("wsss-toco")}
    except metadata.PackageNotFoundError:
        return {"package_version": None}


def provenance(
    checkpoint: str | Path,
    state: dict[str, Any],
    protocol: dict[str, Any],
    dataset: str,
    split: str,
    num_images: int,
    world_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """The record evaluate.py puts under "provenance" in its JSON."""
    return {
        "checkpoint": {
            "path": str(checkpoint),
            "sha256": sha256_file(checkpoint),
            "iteration": state.get("iteration"),
        },
        "train_config": state["config"],
        "protocol": protocol,
        "data": {"dataset": dataset, "split": split, "num_images": num_images},
        "world_size": world_size,
        "code": code_version(),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
    }
