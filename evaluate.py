"""Evaluate a checkpoint: seg, CAM or pseudo-label mIoU on a split, exports and reports.

Scores go to stdout and --output-json; predictions, pseudo labels or a test-server archive to
--save-dir; an HTML page to --report.

    python evaluate.py --checkpoint work_dirs/synthetic/checkpoints/last.pt --mode seg
    torchrun --nproc_per_node=4 evaluate.py --checkpoint last.pt --protocol voc-ms --crf
"""

from __future__ import annotations

import argparse
import sys

from datasets import DATASETS
from toco.cli import ArgumentParser, run_cli
from toco.evaluation.protocol import PROTOCOL_NAMES
from toco.evaluation.run import MODES, EvalRequest, run_evaluation
from toco.evaluation.submission import SUBMISSION_FORMATS
from toco.method.inference import FUSIONS, PATCH_FITS


def parse_args(argv: list[str] | None) -> EvalRequest:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoints/last.pt of a run, its release .safetensors, or an official "
        "ToCo checkpoint (converted on the fly)",
    )
    p.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        help="dataset kind (default: the one the model was trained on)",
    )
    p.add_argument("--data-root", help="dataset root (default: the training run's)")
    p.add_argument("--cache-dir", help="label/synthetic cache (default: the training run's)")
    p.add_argument(
        "--split",
        help="split list to evaluate (default: the dataset's validation "
        "split: val for VOC, val_part for COCO)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="seg",
        help="seg: decoder predictions; cam: CAMs masked by the GT image labels; "
        "pseudo: the training rule's PAR-refined pseudo labels (255 = uncertain)",
    )
    g = p.add_argument_group("protocol (see README, Evaluation)")
    g.add_argument(
        "--protocol",
        choices=PROTOCOL_NAMES,
        default="train-val",
        help="train-val: 448 square, one seg scale (ToCo's in-training validation); "
        "voc-ms: original size, scales 1.0/1.5/1.25, flip SUM, scales MAX; "
        "coco-ms: 448 square, scales 1.0/1.25/1.5, flip MAX, scales SUM",
    )
    g.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=None,
        help="override the protocol's scales (seg scales in seg mode, CAM scales in "
        "cam/pseudo mode)",
    )
    g.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override whether mirrored inputs are added",
    )
    g.add_argument(
        "--size",
        type=int,
        default=None,
        help="override the square the inputs are resized to (0: original size)",
    )
    g.add_argument("--flip-fusion", choices=FUSIONS, help="override the flip-pair fusion")
    g.add_argument("--scale-fusion", choices=FUSIONS, help="override the scale fusion")
    g.add_argument(
        "--patch-fit",
        choices=PATCH_FITS,
        default="pad",
        help="sides that are not a multiple of the patch: pad and crop back (fix of "
        "B12) or floor and stretch (the official tools)",
    )
    g.add_argument(
        "--bkg-thre", type=float, default=None, help="CAM background threshold (default: the run's)"
    )
    g.add_argument(
        "--crf",
        action="store_true",
        help="dense CRF: on the softmax of the fused seg logits (ToCo's: 10 steps, "
        "Gaussian sxy 1 / w 1, bilateral sxy 121 / srgb 5 / w 4), or in pseudo "
        "mode on each PAR-refined stack (ToCo's label tool: sxy 3 / w 3, "
        "bilateral sxy 36 / srgb 3 / w 4)",
    )
    g.add_argument(
        "--crf-backend",
        choices=["torch", "pydensecrf"],
        default="torch",
        help="CRF implementation: torch (any device) or pydensecrf (needs the "
        "optional pydensecrf2 package; CPU, for comparison)",
    )
    o = p.add_argument_group("outputs")
    o.add_argument("--output-json", help="write the scores and their provenance here")
    o.add_argument(
        "--save-dir",
        help="write predictions as palette PNGs: <id>.png (seg, cam), "
        "SegmentationClassAug/<id>.png + ImageSets/Segmentation/<split>.txt "
        "(pseudo), or the server layout + results.tar.gz (--submission)",
    )
    o.add_argument(
        "--predict-only",
        action="store_true",
        help="a split without masks (e.g. VOC test): only --save-dir, no scores",
    )
    o.add_argument(
        "--submission",
        choices=SUBMISSION_FORMATS,
        help="voc: test-server archive <save-dir>/results.tar.gz of "
        "results/VOC2012/Segmentation/comp6_test_cls/<id>.png",
    )
    o.add_argument(
        "--save-logits",
        help="seg mode: also dump each image's fused logits "
        "(float16 .npy, C x H x W) here; large, off by default",
    )
    o.add_argument("--report", help="write a static HTML report (index.html) into this folder")
    o.add_argument(
        "--report-images",
        type=int,
        default=4,
        help="how many worst and best images the report shows",
    )
    r = p.add_argument_group("runtime")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r.add_argument(
        "--amp",
        choices=["none", "bf16", "fp16", "run"],
        default="none",
        help="autocast precision of the forward passes (none = fp32, as ToCo's "
        "tools; run = the training run's --amp, as its in-training validation)",
    )
    r.add_argument("--workers", type=int, default=2, help="data-loader processes per rank")
    args = p.parse_args(argv)
    request = EvalRequest(**vars(args))
    request.check()
    return request


def main(argv: list[str] | None = None) -> int:
    run_evaluation(parse_args(argv))
    return 0


def cli() -> int:
    """The `wsss-evaluate` console script: `main` with user errors as one line."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
