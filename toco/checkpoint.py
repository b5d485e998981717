"""Checkpoints: written atomically with the user's file mode, loaded with `weights_only=True`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from toco.atomic import atomic_path
from toco.errors import UserError

# Bumped when the layout of a training checkpoint changes; older files are refused by name.
CHECKPOINT_FORMAT = 1
TRAINING_KEYS = ("model", "trainer", "iteration", "config", "torch_rng")


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A run killed mid-write leaves the previous checkpoint intact (rename is atomic on POSIX).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, fh)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; unreadable files are a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise UserError(
            f"cannot read checkpoint {path}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'corrupt file'}"
        ) from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise UserError(f"{path} is not a checkpoint of this project (no model/config entries)")
    version = payload.get("format", CHECKPOINT_FORMAT)
    if version != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} has checkpoint format {version}; this version of the project "
            f"reads format {CHECKPOINT_FORMAT}"
        )
    return payload


def check_training_keys(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """A checkpoint to resume from needs every training entry, not only the weights."""
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise UserError(
            f"{path} cannot resume a run: it lacks {', '.join(missing)} (a "
            "release or another project's file? evaluate.py can still read its "
            "weights if it has 'model')"
        )


def load_weights(
    module: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    what: str = "model",
) -> None:
    """`module.load_state_dict(weights)`, with mismatches reported as one line naming the keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label} {_few(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", reshaped),
        )
        if keys
    ]
    if problems:
        raise UserError(
            f"{path}: the {what} weights do not fit this configuration (another "
            f"project version or settings?): {'; '.join(problems)}"
        )
    module.load_state_dict(weights)


def _few(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
