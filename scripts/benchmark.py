"""Training and inference speed of a recipe, and where a training step spends its time.

    python -m scripts.benchmark --backbone deit_tiny_patch16_224 --pretrained none \\
        --crop-size 160 --batch-size 4 --dataset voc --data-root unused --json bench.json
    python -m scripts.benchmark --config configs/voc_vit_b.yaml --data-root unused --device cuda

Every train.py flag is accepted (recipe, backbone, crop, batch, plug-ins, --amp, --threads ...);
the batches are random images of the recipe's shape (1-3 classes per image, full image boxes),
so no dataset is read (data loading is not part of the step time). Every loss term is on: the
steps run at an iteration past every start iteration.

Measured, in interleaved rounds (full step, bare backbone step, full, bare, ...), medians:
- s/iteration and images/s of the full ToCo step (optimizer included);
- exclusive time per stage of the step (main pass, multi-scale CAM, CTC views, pseudo labels,
  losses, backward, optimizer);
- ViT passes and images through the encoder per iteration;
- the bare backbone step (timm forward_features of the same batch and crop, mean of the tokens
  as the loss, backward, AdamW) and the overhead factor full / bare;
- inference images/s (single-scale segmentation at the validation size, batch 1);
- peak memory: max RSS of this process on the CPU, max allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
from pathlib import Path

import torch

from scripts.timing import time_interleaved, timed
from toco.build import (
    build_loss_modules,
    build_model,
    compile_backbone,
)
from toco.config import TrainConfig, parse_config
from toco.plugins import build_plugins
from toco.runtime import configure_precision, resolve_device
from toco.train.engine import Trainer
from toco.train.profiling import PassCounter

STAGES = ("main_pass", "ms_cam", "ctc_views", "pseudo_labels", "losses", "backward", "optimizer")


def _extra(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("benchmark")
    g.add_argument("--iters", type=int, default=5, help="timed steps per round and side")
    g.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    g.add_argument("--num-classes", type=int, default=21, help="classes incl. background")
    g.add_argument("--json", help="write the results here")
    g.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend for --compile ('eager': a quick CPU check)",
    )


def random_batch(cfg: TrainConfig, num_classes: int, gen: torch.Generator) -> dict:
    b, s = cfg.batch_size, cfg.crop_size

    def image() -> torch.Tensor:
        return torch.randint(0, 256, (b, 3, s, s), generator=gen, dtype=torch.uint8)

    labels = torch.zeros(b, num_classes - 1)
    for i in range(b):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        labels[i, torch.randperm(num_classes - 1, generator=gen)[:k]] = 1
    return {
        "image": image(),
        "view2": image(),
        "local_view": image(),
        "cls_label": labels,
        "img_box": torch.tensor([[0, s, 0, s]] * b),
    }


def all_terms_on(cfg: TrainConfig) -> int:
    starts = [
        cfg.seg_start_iter,
        cfg.contrast_start_iter,
        cfg.aux_cam_until_iter,
        cfg.plugins.first_start(cfg),
    ]
    return max(starts) + 1


class BareBackbone:
    """timm's forward_features + backward + AdamW: the floor a ViT training step costs."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        import timm

        kwargs = {"depth": cfg.backbone_depth} if cfg.backbone_depth else {}
        self.model = timm.create_model(
            cfg.backbone, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
        ).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6, foreach=True)
        self.device = device

    def step(self, batch: dict, autocast) -> None:
        x = batch["image"].to(self.device).float().div_(255)
        with autocast():
            loss = self.model.forward_features(x).float().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


@torch.no_grad()
def inference_rate(model, cfg: TrainConfig, device: torch.device, autocast, n: int) -> float:
    from toco.method.inference import predict_seg_logits

    model.eval()
    size = cfg.val_size or cfg.crop_size
    x = torch.rand(1, 3, size, size, device=device)
    with autocast():
        predict_seg_logits(model, x, size=size)
        seconds = timed(lambda: predict_seg_logits(model, x, size=size), device, n)
    model.train()
    return 1.0 / seconds


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_config(argv, extra=_extra)
    device = resolve_device(cfg.device)
    configure_precision(cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, args.num_classes).to(device)
    compile_backbone(model, cfg.compile, args.compile_backend)  # as train.py: the full step
    plugins = build_plugins(cfg, model.backbone.embed_dim, args.num_classes, model=model)
    trainer = Trainer(cfg, model, build_loss_modules(cfg) + plugins, device)
    bare = BareBackbone(cfg, device)
    counter = PassCounter(model.backbone)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = [random_batch(cfg, args.num_classes, gen) for _ in range(4)]
    it = all_terms_on(cfg)

    def full_step(_: int = 0) -> None:
        nonlocal it
        trainer.train_step(batches[it % len(batches)], it)
        it += 1

    def bare_step(_: int = 0) -> None:
        bare.step(batches[it % len(batches)], trainer.autocast)

    for _ in range(args.warmup):
        full_step()
        bare_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stages: dict[str, float] = {}
    counter.reset()  # the bare step has its own backbone: the counter sees the full steps only
    wall, _ = time_interleaved(
        {"full": full_step, "bare": bare_step},
        args.iters,
        args.rounds,
        device=device,
        block=args.iters,
    )
    full, floor = wall["full"], wall["bare"]
    n_passes, n_images = counter.reset()
    passes = [(n_passes / (args.iters * args.rounds), n_images / (args.iters * args.rounds))]
    trainer.stages.enabled = True
    trainer.stages.reset()
    for _ in range(args.iters):
        full_step()
    stage_totals = trainer.stages.reset()
    trainer.stages.enabled = False
    for k in STAGES:
        stages[k] = stage_totals.get(k, 0.0) / args.iters
    peak = peak_memory_gb(device)
    s_it, s_bare = statistics.median(full), statistics.median(floor)
    result = {
        "machine": {
            "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "config": {
            "backbone": cfg.backbone,
            "crop_size": cfg.crop_size,
            "batch_size": cfg.batch_size,
            "amp": cfg.amp,
            "recipe": cfg.recipe,
            "compile": cfg.compile,
            "tf32": cfg.tf32,
            "plugins": cfg.plugins.enabled(),
        },
        "train_s_per_iter": s_it,
        "train_s_per_iter_rounds": full,
        "train_images_per_s": cfg.batch_size / s_it,
        "stage_s_per_iter": stages,
        "vit_passes_per_iter": passes[-1][0],
        "vit_images_per_iter": passes[-1][1],
        "bare_backbone_s_per_iter": s_bare,
        "bare_backbone_rounds": floor,
        "overhead_vs_bare": s_it / s_bare,
        "inference_images_per_s": inference_rate(
            model, cfg, device, trainer.autocast, max(args.iters, 3)
        ),
        "peak_memory_gb": peak,
        "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "max RSS",
    }
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def print_table(r: dict) -> None:
    c = r["config"]
    print(
        f"{c['backbone']}  crop {c['crop_size']}  batch {c['batch_size']}  amp {c['amp']}  "
        f"plug-ins {'+'.join(c['plugins']) or 'none'}  on {r['machine']['device']} "
        f"({r['machine']['threads']} threads)"
    )
    print(
        f"  training      {r['train_s_per_iter']:.3f} s/iter   "
        f"{r['train_images_per_s']:.2f} images/s   rounds "
        + ", ".join(f"{v:.3f}" for v in r["train_s_per_iter_rounds"])
    )
    print(
        f"  bare backbone {r['bare_backbone_s_per_iter']:.3f} s/iter   "
        f"overhead x{r['overhead_vs_bare']:.2f}"
    )
    print(
        f"  ViT passes    {r['vit_passes_per_iter']:.1f} per iter, "
        f"{r['vit_images_per_iter']:.0f} images through the encoder"
    )
    total = sum(r["stage_s_per_iter"].values())
    for k, v in r["stage_s_per_iter"].items():
        print(f"    {k:<14}{v:8.3f} s  {100 * v / max(total, 1e-12):5.1f}%")
    print(f"  inference     {r['inference_images_per_s']:.2f} images/s (seg, 1 scale)")
    print(f"  peak memory   {r['peak_memory_gb']:.2f} GB ({r['peak_memory_kind']})")


if __name__ == "__main__":
    from toco.cli import run_cli

    sys.exit(run_cli(lambda: main(sys.argv[1:]) and 0))
