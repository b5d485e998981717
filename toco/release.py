"""The release file: a model's inference weights as .safetensors, with the metadata every
reader relies on (toco.export writes them from checkpoints, toco.convert from official ones)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from datasets.files import voc_palette
from toco.atomic import atomic_path
from toco.errors import UserError, storage_error

TRAINING_ONLY_PREFIXES = ("proj_head_teacher.",)


def write_release(
    output: str | Path,
    tensors: dict,
    config: dict,
    *,
    iteration: int,
    class_names: list[str] | tuple[str, ...],
    source: str = "training",
) -> Path:
    """Write a release file atomically: `tensors` plus the metadata every reader relies on.

    Metadata keys (all strings): `config` (the TrainConfig as JSON), `iteration`, `class_names`
    (JSON list, background first, one entry per output channel), `palette` (JSON list of one
    [r, g, b] per class: the colours of masks and overlays, the VOC colour map), `source`
    (where the weights came from: "training" or the converter's name).
    """
    out = Path(output)
    tensors = {
        k: v.contiguous() for k, v in tensors.items() if not k.startswith(TRAINING_ONLY_PREFIXES)
    }
    metadata = {
        "config": json.dumps(config),
        "iteration": str(iteration),
        "class_names": json.dumps(list(class_names)),
        "palette": json.dumps(class_palette(len(class_names))),
        "source": source,
    }
    try:
        with atomic_path(out) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except OSError as err:
        raise storage_error(err, f"{out} is unchanged") or err from None
    return out


def class_palette(num_classes: int) -> list[list[int]]:
    """[r, g, b] of class ids 0..num_classes-1 in the VOC colour map (as in every mask PNG)."""
    flat = voc_palette()
    return [flat[3 * k : 3 * k + 3] for k in range(num_classes)]


def is_release(path: str | Path) -> bool:
    """Whether `path` is a .safetensors file (its header), whatever its name; a training
    checkpoint is a zip (torch.save) and fails this test."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def read_release(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    """A release as a checkpoint-like dict: `model` (tensors), `config`, `iteration`,
    `class_names` and `palette` (None for files written before they were stored) and
    `source`."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            meta = fh.metadata() or {}
            state = {
                "config": json.loads(meta["config"]),
                "iteration": int(meta.get("iteration", 0)),
                "class_names": (json.loads(meta["class_names"]) if "class_names" in meta else None),
                "palette": json.loads(meta["palette"]) if "palette" in meta else None,
                "source": meta.get("source", "training"),
                "model": {k: fh.get_tensor(k) for k in fh.keys()},
            }
    except (OSError, KeyError, ValueError, SafetensorError) as err:  # JSONDecodeError: a ValueError
        raise UserError(f"cannot read release file {path}: {err}") from None
    return state
