"""Train a ToCo-style single-stage WSSS model.

python train.py                                   # tiny ViT on the built-in synthetic set
python train.py --config configs/voc_vit_b.yaml --data-root VOCdevkit/VOC2012
"""

from __future__ import annotations

import sys

from toco.cli import run_cli
from toco.config import parse_config


def main(argv: list[str] | None = None) -> int:
    def extra(parser):
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --work-dir from checkpoints/last.pt",
        )

    cfg, args = parse_config(argv, extra)
    # heavy imports after the flags are known to be valid
    from toco.train.runner import run_training

    run_training(cfg, resume=args.resume)
    return 0


def cli() -> int:
    """The `wsss-train` console script: `main` with user errors as one line."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
