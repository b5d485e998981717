"""Predict segmentation masks for any images with a trained model (checkpoint or release).

    python predict.py --model model.safetensors photos/ --output predictions/
    python predict.py --model work_dirs/run/checkpoints/last.pt @list.txt --output out --cams

Writes OUT/masks/<name>.png (index PNG, VOC palette, the image's size), OUT/overlays/<name>.jpg,
with --cams OUT/cams/<name>/<k>-<class>.png, and OUT/predictions.jsonl (docs/predict.md).
"""

from __future__ import annotations

import argparse
import sys

from toco.cli import ArgumentParser, run_cli
from toco.evaluation.protocol import PROTOCOL_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:])
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="image files, folders (searched recursively for .jpg .jpeg .png .webp "
        ".bmp .tif .tiff) or @LIST (a text file of paths, one a line, relative "
        "to the list's folder)",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        required=True,
        help="a training checkpoint (checkpoints/last.pt) or a release .safetensors",
    )
    m.add_argument(
        "--protocol",
        choices=PROTOCOL_NAMES,
        default="train-val",
        help="train-val: the run's validation square, one pass; voc-ms: "
        "original size, scales 1.0/1.5/1.25 with flips; coco-ms: 448 square, "
        "scales 1.0/1.25/1.5 with flips (slower, as in evaluate.py)",
    )
    i = p.add_argument_group("inputs and outputs")
    i.add_argument(
        "--list",
        dest="lists",
        action="append",
        default=[],
        metavar="FILE",
        help="a text list of inputs, as @FILE (may be repeated)",
    )
    i.add_argument("--output", required=True, metavar="OUT", help="folder to write into")
    i.add_argument(
        "--cams", action="store_true", help="also write the CAM heat-map of each present class"
    )
    i.add_argument(
        "--no-overlays",
        dest="overlays",
        action="store_false",
        help="do not write the overlay pictures",
    )
    i.add_argument(
        "--strict",
        action="store_true",
        help="exit non-zero if any input cannot be read (default: only if none can)",
    )
    r = p.add_argument_group("runtime")
    r.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    r.add_argument(
        "--workers",
        type=int,
        default=2,
        help="threads decoding the next batch while the model runs",
    )
    r.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from toco.predict.batch import PredictRequest, run_prediction  # torch after the flags

    run_prediction(PredictRequest(**vars(args)))
    return 0


def cli() -> int:
    """The `wsss-predict` console script: `main` with user errors as one line."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
