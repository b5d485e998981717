"""MCIS cross-image CAMs of a checkpoint trained with --mcis (the paper's inference with related
images), scored on a labelled split:

    python -m toco.evaluation.mcis --checkpoint work_dirs/run/checkpoints/last.pt --partners 3

For every image and each of its ground-truth classes, `--partners` images of the *training*
split with that class are drawn (seeded; `--partner-split` to change), as the paper does when it
pseudo-labels the training set; the co-attention maps of the image w.r.t. them, plus those of its
self-pairs (mirror, 0.75x, 2x; `--no-self-pairs` to skip) that pass the score filter
(`--score-thr`), are combined per class (toco.plugins.mcis.cross_image_cam) and scored like CAMs
(`evaluate.py --mode cam`). Costs 3 x |labels| + 3 pair passes per image; the segmentation
decoder is not involved.
"""

from __future__ import annotations

import random
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toco.errors import ConfigError
from toco.plugins.mcis import CrossImageSemantics, cross_image_cam, sample_partners


def load_trained_mcis(checkpoint: str, device: torch.device):
    """(cfg, model, MCIS loss module) of a checkpoint trained with --mcis, in eval mode."""
    from toco import build
    from toco.build import build_loss_modules, build_model
    from toco.checkpoint import load_checkpoint, load_weights
    from toco.config import TrainConfig
    from toco.plugins import build_plugins

    state = load_checkpoint(checkpoint, map_location=device)
    cfg = TrainConfig.from_saved(state["config"])
    if not cfg.plugins.mcis.enable:
        raise ConfigError(f"{checkpoint} was not trained with --mcis: it has no co-attention head")
    num_classes = build.dataset_spec(cfg).num_classes
    model = build_model(cfg, num_classes, pretrained="none").to(device)
    load_weights(model, state["model"], checkpoint)
    modules = nn.ModuleList(
        build_loss_modules(cfg)
        + build_plugins(cfg, model.backbone.embed_dim, num_classes, model=model)
    ).to(device)
    modules.load_state_dict(state["trainer"]["loss_modules"])
    plugin = next(m for m in modules if isinstance(m, CrossImageSemantics))
    return cfg, model.eval(), plugin.eval()


def _labels(dataset) -> Tensor:
    return torch.stack([torch.as_tensor(dataset.labels[n]) for n in dataset.names])


@torch.no_grad()
def evaluate_cross_image_cams(
    model: nn.Module,
    plugin: CrossImageSemantics,
    dataset,
    num_classes: int,
    partners: int,
    bkg_thre: float,
    device: torch.device,
    size: Optional[int] = None,
    seed: int = 0,
    partner_set=None,
    self_pairs: bool = True,
    score_thr: float = 0.1,
):
    """Score MCIS's cross-image CAMs on a labelled split: for every image and each of its
    classes, `partners` images of `partner_set` (the training split; default: `dataset`
    itself) with that class (seeded draw), at `size` x `size` when given; self-pairs and the
    score filter as in `cross_image_cam`. Returns a ConfusionMatrix."""
    from toco.method.inference import cams_to_prediction
    from toco.method.metrics import ConfusionMatrix

    partner_set = dataset if partner_set is None else partner_set
    labels, pool_labels = _labels(dataset), _labels(partner_set)
    same = partner_set is dataset
    rng = random.Random(seed)
    result = ConfusionMatrix(num_classes, device=device)

    def load(ds, i: int) -> Tensor:
        x = ds[i]["image"][None].to(device).float().div_(255)
        return (
            F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if size else x
        )

    for i in range(len(dataset)):
        sample = dataset[i]
        image = sample["image"][None].to(device).float().div_(255)
        x = load(dataset, i)
        picks = sample_partners(labels[i], pool_labels, partners, rng, exclude=i if same else None)
        cam = cross_image_cam(
            model,
            plugin,
            x,
            labels[i][None].to(device),
            {c: [load(partner_set, j) for j in idx] for c, idx in picks.items()},
            self_pairs,
            score_thr,
        )
        cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)
        pred = cams_to_prediction(cam, labels[i][None].to(device).float(), bkg_thre)
        result.update(pred, sample["mask"][None].to(device))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m toco.plugins.mcis --checkpoint last.pt [--split val] [--partners 3]"""
    import argparse
    import json

    from toco import build
    from toco.method.metrics import format_iou_table
    from toco.runtime import resolve_device

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one clear line (exit 2), as the other commands
            raise ConfigError(message)

    p = Parser(description="MCIS cross-image CAM mIoU of a --mcis checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--partners", type=int, default=3, help="partner images per class")
    p.add_argument(
        "--partner-split",
        default=None,
        help="split the partners come from (default: the training split)",
    )
    p.add_argument(
        "--self-pairs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the co-attention maps of the mirror, 0.75x and 2x self-pairs",
    )
    p.add_argument(
        "--score-thr",
        type=float,
        default=0.1,
        help="a map counts when sigmoid(its mean) exceeds this (official 0.1)",
    )
    p.add_argument("--size", type=int, default=None, help="resize images to a square")
    p.add_argument("--bkg-thre", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    if args.partners < 1:
        raise ConfigError("--partners must be at least 1")
    device = resolve_device(args.device)
    cfg, model, plugin = load_trained_mcis(args.checkpoint, device)
    spec = build.dataset_spec(cfg)
    dataset = build.eval_dataset(cfg, args.split)
    partner_split = args.partner_split or cfg.train_split or spec.train_split
    partner_set = build.eval_dataset(cfg, partner_split, with_masks=False)
    result = evaluate_cross_image_cams(
        model,
        plugin,
        dataset,
        spec.num_classes,
        args.partners,
        cfg.bkg_thre if args.bkg_thre is None else args.bkg_thre,
        device,
        args.size,
        args.seed,
        partner_set=partner_set,
        self_pairs=args.self_pairs,
        score_thr=args.score_thr,
    )
    print(format_iou_table(list(spec.class_names), {"mcis_cam": result.iou()}))
    report = {
        "miou": result.miou(),
        "mode": "mcis_cam",
        "split": args.split,
        "partner_split": partner_split,
        "partners": args.partners,
        "self_pairs": args.self_pairs,
        "score_thr": args.score_thr,
        "num_images": len(dataset),
    }
    print(f"mIoU (cross-image CAM): {report['miou']:.2f}")
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    from toco.cli import run_cli

    sys.exit(run_cli(main))
