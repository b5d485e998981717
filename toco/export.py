"""Release export: model weights as .safetensors, the training config in its metadata.

    python -m toco.export --checkpoint work_dirs/run/checkpoints/last.pt --output model.safetensors

The EMA teacher head is dropped (it is only used for training); `load_release` rebuilds the
network from the embedded config with random-init backbone weights and loads the file.
`load_model` reads either kind of file (a release or a training checkpoint, told apart by
content), as evaluate.py, predict.py and `toco.load_segmenter` do.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from toco.checkpoint import load_checkpoint, load_weights
from toco.cli import ArgumentParser, run_cli
from toco.release import TRAINING_ONLY_PREFIXES, is_release, read_release, write_release

__all__ = [
    "TRAINING_ONLY_PREFIXES",
    "export_release",
    "is_release",
    "load_model",
    "load_model_state",
    "load_release",
    "read_release",
    "with_training_heads",
    "write_release",
]


def export_release(checkpoint: str, output: str) -> Path:
    """Write the inference weights of `checkpoint` to `output` atomically."""
    from toco import build
    from toco.config import TrainConfig

    state = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_saved(state["config"], checkpoint)
    # A tagged collection's names come from its root: the checkpoint keeps them (the root may
    # be elsewhere by now).
    names = state.get("class_names") or build.dataset_spec(cfg).class_names
    return write_release(
        output, state["model"], state["config"], iteration=state["iteration"], class_names=names
    )


def load_model_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint, a release file or an official ToCo checkpoint (converted on the
    fly), as a dict with at least `model` and `config`."""
    from toco.convert import checkpoint_state, is_official_checkpoint

    if is_release(path):
        return read_release(path, str(map_location))
    if is_official_checkpoint(path):
        return checkpoint_state(path)
    return load_checkpoint(path, map_location=map_location)


def with_training_heads(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`tensors` plus the training-only heads a release leaves out, at the model's own values
    (inference never runs them)."""
    return {
        **{k: v for k, v in model.state_dict().items() if k.startswith(TRAINING_ONLY_PREFIXES)},
        **tensors,
    }


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config, state) from a training checkpoint or a release file.

    state["class_names"] is the file's list, or for files that hold none (checkpoints, older
    releases) the class names of the dataset the model was trained on.
    """
    return _build(load_model_state(path), path, device)


def load_release(path: str, device: str = "cpu"):
    """(model, config) from a release file written by `export_release`."""
    model, cfg, _ = _build(read_release(path), path, device)
    return model, cfg


def _build(state: dict[str, Any], path: str | Path, device: str | torch.device):
    from toco import build
    from toco.build import build_model
    from toco.config import TrainConfig

    cfg = TrainConfig.from_saved(state["config"], str(path))
    state["class_names"] = list(state.get("class_names") or build.dataset_spec(cfg).class_names)
    model = build_model(cfg, len(state["class_names"]), pretrained="none")
    # The training-only heads are not in a release: they keep their initial weights.
    load_weights(model, with_training_heads(model, state["model"]), path)
    return model.to(device).eval(), cfg, state


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    print(export_release(args.checkpoint, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
