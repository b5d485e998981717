"""Training-step time with a frozen / partly frozen backbone against full fine-tuning.

    python -m scripts.bench_frozen --threads 1 --steps 6 --rounds 2
    python -m scripts.bench_frozen --device cuda --crop-size 448 --backbone vit_base_patch14_dinov2

Times `Trainer.train_step` (all ToCo losses on from iteration 0) on fixed random batches for:
`full` (every backbone parameter trains), `frozen` (--freeze-backbone: no autograd graph through
the encoder, no backward through it) and `last2` (--trainable-blocks 2). Configurations are
interleaved step by step; medians of wall and process CPU time are reported, with the ratio to
`full`, as a table and optionally as JSON.
"""

from __future__ import annotations

import json
import statistics

import torch

from scripts.bench_plugins import bench_parser, make_batch, trainer_steps
from scripts.timing import time_interleaved
from toco.build import build_loss_modules, build_model
from toco.config import TrainConfig
from toco.train.engine import Trainer

FLAGS = {"full": {}, "frozen": {"freeze_backbone": True}, "last2": {"trainable_blocks": 2}}


def build(cfg: TrainConfig, num_classes: int, device: torch.device) -> Trainer:
    torch.manual_seed(0)
    return Trainer(cfg, build_model(cfg, num_classes).to(device), build_loss_modules(cfg), device)


def main() -> None:
    p = bench_parser(
        __doc__.splitlines()[0],
        "deit_small_patch16_224",
        batch_size=2,
        num_local_crops=4,
        steps=6,
        warmup=1,
    )
    p.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    p.add_argument("--configs", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    common = dict(
        backbone=args.backbone,
        pretrained=args.pretrained,
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        num_local_crops=args.num_local_crops,
        local_crop_size=min(96, args.crop_size // 2),
        backbone_depth=args.depth,
        device=args.device,
        seg_start_iter=0,
        warmup_iters=1,
        w_reg=0.05,
        amp="none" if device.type == "cpu" else "auto",
    )
    trainers = {
        n: build(TrainConfig(**common, **FLAGS[n]).validate(), args.num_classes, device)
        for n in args.configs
    }
    batches = [
        make_batch(trainers[args.configs[0]].cfg, args.num_classes - 1, i)
        for i in range(args.steps + args.warmup)
    ]
    wall, cpu = time_interleaved(
        trainer_steps(trainers, batches), len(batches), args.rounds, args.warmup, device
    )
    result = {
        "device": args.device,
        "threads": args.threads,
        "backbone": args.backbone,
        "depth": args.depth,
        "crop_size": args.crop_size,
        "batch_size": args.batch_size,
        "num_local_crops": args.num_local_crops,
        "steps": {},
    }
    ref = args.configs[0]
    ref_wall, ref_cpu = statistics.median(wall[ref]), statistics.median(cpu[ref])
    print(f"| config | s/step (wall) | s/step (CPU) | wall vs {ref} | CPU vs {ref} |")
    print("|---|---|---|---|---|")
    for name in trainers:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        result["steps"][name] = {
            "median_s": w,
            "median_cpu_s": c,
            "n": len(wall[name]),
            "ratio": w / ref_wall,
            "ratio_cpu": c / ref_cpu,
        }
        print(f"| {name} | {w:.3f} | {c:.3f} | {w / ref_wall:.2f}x | {c / ref_cpu:.2f}x |")
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
