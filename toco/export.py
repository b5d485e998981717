"""Release export: model weights as .safetensors, the training config in its metadata.

    python -m toco.export --checkpoint work_dirs/run/checkpoints/last.pt --output model.safetensors

The EMA teacher head is dropped (it is only used for training); `load_release` rebuilds the
network from the embedded config with random-init backbone weights and loads the file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from toco.atomic import atomic_path
from toco.checkpoint import load_checkpoint, load_weights
from toco.cli import run_cli
from toco.errors import UserError
from toco.faults import storage_error

TRAINING_ONLY_PREFIXES = ("proj_head_teacher.",)


def write_release(output: str | Path, tensors: dict, config: dict, *, iteration: int,
                  class_names: list[str] | tuple[str, ...], source: str = "training") -> Path:
    """Write a release file atomically: `tensors` plus the metadata every reader relies on.

    Metadata keys (all strings): `config` (the TrainConfig as JSON), `iteration`, `class_names`
    (JSON list, background first, one entry per output channel), `source` (where the weights
    came from: "training" or the converter's name).
    """
    out = Path(output)
    tensors = {k: v.contiguous() for k, v in tensors.items()
               if not k.startswith(TRAINING_ONLY_PREFIXES)}
    metadata = {"config": json.dumps(config), "iteration": str(iteration),
                "class_names": json.dumps(list(class_names)), "source": source}
    try:
        with atomic_path(out) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except OSError as err:
        raise storage_error(err, f"{out} is unchanged") or err from None
    return out


def export_release(checkpoint: str, output: str) -> Path:
    """Write the inference weights of `checkpoint` to `output` atomically."""
    from toco import data
    from toco.config import TrainConfig

    state = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_saved(state["config"], checkpoint)
    return write_release(output, state["model"], state["config"], iteration=state["iteration"],
                         class_names=data.dataset_spec(cfg).class_names)


def load_release(path: str, device: str = "cpu"):
    """(model, config) from a release file written by `export_release`."""
    from toco import data
    from toco.builders import build_model
    from toco.config import TrainConfig

    try:
        with safe_open(path, framework="pt", device=device) as fh:
            cfg = TrainConfig.from_saved(json.loads(fh.metadata()["config"]), path)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read release file {path}: {err}") from None
    model = build_model(cfg, data.dataset_spec(cfg).num_classes, pretrained="none")
    # The training-only heads are not in the file: they keep their initial weights.
    tensors.update({k: v for k, v in model.state_dict().items()
                    if k.startswith(TRAINING_ONLY_PREFIXES)})
    load_weights(model, tensors, path)
    return model.to(device).eval(), cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    print(export_release(args.checkpoint, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
