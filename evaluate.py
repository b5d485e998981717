"""Evaluate a checkpoint: segmentation or CAM mIoU on a split, printed and written as JSON.

    python evaluate.py --checkpoint work_dirs/synthetic/checkpoints/last.pt --mode seg
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from datasets import DATASETS
from toco.cli import run_cli
from toco.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoints/last.pt of a run")
    p.add_argument("--dataset", choices=sorted(DATASETS),
                   help="dataset kind (default: the one the model was trained on)")
    p.add_argument("--data-root", help="dataset root (default: the training run's)")
    p.add_argument("--cache-dir", help="label/synthetic cache (default: the training run's)")
    p.add_argument("--split", default="val", help="split list to evaluate")
    p.add_argument("--mode", choices=["seg", "cam"], default="seg",
                   help="seg: decoder predictions; cam: CAMs masked by the GT image labels")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="inference scales (default: 1.0 for seg, 1.0 0.5 1.5 for cam)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add horizontally flipped inputs (default: off for seg, on for cam)")
    p.add_argument("--size", type=int, default=None,
                   help="resize inputs to a size x size square (default: original size)")
    p.add_argument("--bkg-thre", type=float, default=None,
                   help="CAM background threshold (default: the run's)")
    p.add_argument("--crf", action="store_true",
                   help="seg mode: refine the softmax with ToCo's dense CRF (10 mean-field "
                        "steps, Gaussian sxy 1 / w 1, bilateral sxy 121 / srgb 5 / w 4) "
                        "before the argmax")
    p.add_argument("--crf-backend", choices=["torch", "pydensecrf"], default="torch",
                   help="CRF implementation: torch (any device) or pydensecrf (needs the "
                        "optional pydensecrf2 package; CPU, for comparison)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--output-json", help="write the scores to this JSON file")
    p.add_argument("--save-dir", help="write each prediction as a palette PNG <id>.png here "
                   "(e.g. CRF-refined pseudo labels, or test-server submissions)")
    p.add_argument("--predict-only", action="store_true",
                   help="seg mode on a split without masks (e.g. VOC test): only --save-dir")
    args = p.parse_args(argv)
    if args.predict_only and (args.mode != "seg" or not args.save_dir):
        raise ConfigError("--predict-only needs --mode seg and --save-dir")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from torch.utils.data import DataLoader

    from toco import data
    from toco.builders import build_model, resolve_device
    from toco.checkpoint import load_checkpoint
    from toco.config import TrainConfig
    from datasets.files import save_palette_png
    from toco.crf import CRF_BACKENDS, pydensecrf_available
    from toco.inference import cams_to_prediction, predict_cams, predict_seg_logits
    from toco.metrics import ConfusionMatrix, format_iou_table

    if args.crf and args.mode != "seg":
        raise ConfigError("--crf refines segmentation predictions: use it with --mode seg")
    if args.crf and args.crf_backend == "pydensecrf" and not pydensecrf_available():
        raise ConfigError("--crf-backend pydensecrf needs pydensecrf2: pip install 'cython<3' "
                          "&& pip install --no-build-isolation pydensecrf2")
    crf = CRF_BACKENDS[args.crf_backend] if args.crf else None

    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint, map_location=device)
    overrides = {k: v for k, v in (("dataset", args.dataset), ("data_root", args.data_root),
                                   ("cache_dir", args.cache_dir)) if v is not None}
    cfg = TrainConfig.from_dict({**state["config"], **overrides}, "checkpoint config")
    spec = data.dataset_spec(cfg)
    dataset = data.eval_dataset(cfg, args.split, with_masks=not args.predict_only)
    save_dir = Path(args.save_dir) if args.save_dir else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, spec.num_classes, pretrained="none").to(device)
    model.load_state_dict(state["model"])
    model.eval()

    cam_mode = args.mode == "cam"
    scales = args.scales or ([1.0, 0.5, 1.5] if cam_mode else [1.0])
    flip = args.flip if args.flip is not None else cam_mode
    bkg_thre = cfg.bkg_thre if args.bkg_thre is None else args.bkg_thre
    names = ["cam", "aux_cam"] if cam_mode else ["seg"]
    results = {k: ConfusionMatrix(spec.num_classes, device=device) for k in names}
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=2)
    with torch.no_grad():
        for batch in loader:
            if "mask" not in batch and not args.predict_only:
                raise ConfigError(f"split '{args.split}' has no ground-truth masks to score "
                                  "(use --predict-only --save-dir DIR to export predictions)")
            image = batch["image"].to(device).float().div_(255)
            mask = batch["mask"].to(device) if "mask" in batch else None
            if cam_mode:
                cls_label = batch["cls_label"].to(device).float()
                cams = predict_cams(model, image, scales, flip=flip, size=args.size)
                preds = [cams_to_prediction(cam, cls_label, bkg_thre) for cam in cams]
            else:
                scores = predict_seg_logits(model, image, scales, flip=flip, size=args.size)
                if crf is not None:          # refines the softmax of the fused logits
                    scores = crf(batch["image"], torch.softmax(scores, dim=1))
                preds = [scores.argmax(1)]
            if mask is not None:
                for name, pred in zip(names, preds):
                    results[name].update(pred, mask)
            if save_dir:
                save_palette_png(preds[0][0].byte().cpu().numpy(),
                                 save_dir / f"{batch['name'][0]}.png")
    if args.predict_only:
        print(f"wrote {len(dataset)} predictions to {save_dir}")
        return 0

    print(format_iou_table(list(spec.class_names), {k: r.iou() for k, r in results.items()}))
    main_result = results[names[0]]
    report = {
        "miou": main_result.miou(),
        "iou": {c: (None if v != v else v * 100)
                for c, v in zip(spec.class_names, main_result.iou().tolist())},
        "num_images": len(dataset), "mode": args.mode, "split": args.split,
        "dataset": cfg.dataset, "scales": scales, "flip": flip, "size": args.size,
        "checkpoint": str(args.checkpoint),
        "crf": args.crf_backend if args.crf else None,
    }
    if cam_mode:
        report["bkg_thre"] = bkg_thre
        report["aux_cam_miou"] = results["aux_cam"].miou()
    print(f"mIoU ({args.mode}): {report['miou']:.2f}")
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(report, fh, indent=2)
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
