"""Extra time per training step of each seed plug-in over the base pipeline (same config).

    python -m scripts.bench_plugins --threads 1 --steps 12 --rounds 2          # small, CPU
    python -m scripts.bench_plugins --recipe configs/voc_vit_b.yaml --batch-size 2 \
        --device cuda --steps 20 --rounds 3                    # the base recipe's size, 1 GPU

Times `Trainer.train_step` on fixed random batches (no data loading), plug-ins on from iteration
0 with their default settings, the seg loss (and so the pseudo labels) on from 0, RCA's enqueue
threshold at 0 and its aggregation reading real centroids; the k-means refresh (every
`kmeans_every` iterations) is timed on its own. `--recipe` takes the model, crop and loss
settings of a training recipe (weights random unless --pretrained). Configurations are
interleaved step by step (A B C ... A B C ...) so that load drifts hit them alike; the median
step time of each is reported, as wall time and as the process's CPU time (on a CPU shared with
other jobs the latter is the steadier measure of the work a step does), with the overhead over
`base` and the budget it must stay within (PPC 30%, RCA 10%, MCIS 25%, all three 60%).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from scripts.timing import time_interleaved
from toco.build import (
    build_loss_modules,
    build_model,
)
from toco.cli import ArgumentParser
from toco.config import TrainConfig, load_yaml
from toco.plugins import build_plugins
from toco.train.engine import Trainer

BUDGETS = {"ppc": 0.30, "rca": 0.10, "mcis": 0.25, "all": 0.60}
# recipe keys that concern data or the run, not the step being timed
SKIP_KEYS = ("dataset", "data_root", "train_split", "val_split", "work_dir", "pretrained", "recipe")


def make_batch(cfg: TrainConfig, num_fg: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.batch_size, cfg.crop_size

    def img() -> torch.Tensor:
        return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)

    labels = torch.zeros(b, num_fg)
    for i in range(0, b, 2):  # pairs share class i % num_fg (what the MCIS sampler guarantees)
        labels[i : i + 2, i % num_fg] = 1
        labels[i, (i + 3) % num_fg] = 1
    return {
        "image": img(),
        "view2": img(),
        "local_view": img(),
        "cls_label": labels,
        "img_box": torch.tensor([[0, s, 0, s]] * b),
    }


def build(cfg: TrainConfig, num_classes: int, device: torch.device) -> Trainer:
    torch.manual_seed(0)
    model = build_model(cfg, num_classes).to(device)
    plugins = build_plugins(cfg, model.backbone.embed_dim, num_classes, model=model)
    trainer = Trainer(cfg, model, build_loss_modules(cfg) + plugins, device)
    for p in plugins:
        if hasattr(p, "memory"):  # a full memory and real centroids: the steady state
            m = p.memory
            m.enqueue(
                torch.nn.functional.normalize(
                    torch.randn(m.size, m.num_classes, m.dim, device=device), dim=-1
                ),
                torch.ones(m.size, m.num_classes, dtype=torch.bool, device=device),
            )
            m.refresh_centroids(cfg.plugins.rca.kmeans_iters)
    return trainer


def trainer_steps(
    trainers: dict[str, Trainer], batches: list[dict]
) -> dict[str, Callable[[int], object]]:
    """One step function per trainer for `time_interleaved`: call i trains on batch i mod n."""
    return {
        name: (lambda i, t=trainer: t.train_step(batches[i % len(batches)], i))
        for name, trainer in trainers.items()
    }


def bench_parser(
    description: str, backbone: str, batch_size: int, num_local_crops: int, steps: int, warmup: int
) -> argparse.ArgumentParser:
    """The flags every step benchmark takes (model, batch, device, timing rounds, output)."""
    p = ArgumentParser(description=description)
    p.add_argument("--backbone", default=backbone)
    p.add_argument("--pretrained", default="none", help="'none', 'timm' or a weights file")
    p.add_argument("--crop-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--num-local-crops", type=int, default=num_local_crops)
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--output-json")
    return p


def main() -> None:
    p = bench_parser(
        __doc__.splitlines()[0],
        "deit_tiny_patch16_224",
        batch_size=4,
        num_local_crops=8,
        steps=10,
        warmup=2,
    )
    p.add_argument("--configs", nargs="+", default=["base", "ppc", "rca", "mcis", "all"])
    p.add_argument(
        "--recipe",
        help="YAML recipe whose model, crop and loss settings are timed "
        "(--backbone, --crop-size, --num-local-crops override it)",
    )
    p.set_defaults(backbone=None, crop_size=None, num_local_crops=None)  # recipe, then these:
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    recipe = {
        k: v
        for k, v in (load_yaml(args.recipe) if args.recipe else {}).items()
        if k not in SKIP_KEYS
    }
    given = {
        k: v
        for k, v in (
            ("backbone", args.backbone),
            ("crop_size", args.crop_size),
            ("num_local_crops", args.num_local_crops),
        )
        if v is not None
    }
    common = {
        "backbone": "deit_tiny_patch16_224",
        "crop_size": 160,
        "num_local_crops": 8,
        **recipe,
        **given,
        "dataset": "synthetic",
        "pretrained": args.pretrained,
        "batch_size": args.batch_size,
        "device": args.device,
        "plugin_start_iter": 0,
        "seg_start_iter": 0,
        "warmup_iters": 1,
        "rca_enqueue_thr": 0.0,
        "amp": "none" if device.type == "cpu" else "auto",
    }
    flags = {
        "base": {},
        "ppc": {"ppc": True},
        "rca": {"rca": True},
        "mcis": {"mcis": True},
        "all": {"ppc": True, "rca": True, "mcis": True},
    }
    trainers = {
        n: build(TrainConfig.from_dict({**common, **flags[n]}), args.num_classes, device)
        for n in args.configs
    }
    first = trainers[args.configs[0]].cfg
    batches = [make_batch(first, args.num_classes - 1, i) for i in range(args.steps + args.warmup)]
    times, cpu = time_interleaved(
        trainer_steps(trainers, batches), len(batches), args.rounds, args.warmup, device
    )
    result = {
        "device": args.device,
        "threads": args.threads,
        "backbone": first.backbone,
        "crop_size": first.crop_size,
        "batch_size": args.batch_size,
        "recipe": args.recipe,
        "steps": {},
    }
    base = statistics.median(times["base"]) if "base" in times else None
    base_cpu = statistics.median(cpu["base"]) if "base" in cpu else None
    for name, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        overhead = None if base is None else med / base - 1
        budget = BUDGETS.get(name)
        result["steps"][name] = {
            "median_s": med,
            "median_cpu_s": med_cpu,
            "overhead": overhead,
            "overhead_cpu": None if base_cpu is None else med_cpu / base_cpu - 1,
            "budget": budget,
            "within_budget": None if overhead is None or budget is None else overhead <= budget,
            "n": len(ts),
        }
        extra = (
            ""
            if base is None
            else (
                f"  {(med / base - 1) * 100:+.1f}% wall, "
                f"{(med_cpu / base_cpu - 1) * 100:+.1f}% process CPU"
            )
        )
        if budget is not None and overhead is not None:
            extra += f"  (budget {budget * 100:.0f}%: {'ok' if overhead <= budget else 'OVER'})"
        print(f"{name:5s} {med:.3f} s/step, {med_cpu:.3f} s CPU (n={len(ts)}){extra}")
    if "rca" in trainers:
        mem = next(p for p in trainers["rca"].loss_modules if hasattr(p, "memory")).memory
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        tic = time.perf_counter()
        mem.refresh_centroids(trainers["rca"].cfg.plugins.rca.kmeans_iters)
        sync()
        km = time.perf_counter() - tic
        every = trainers["rca"].cfg.plugins.rca.kmeans_every
        result["rca_kmeans_s"] = km
        print(
            f"rca k-means refresh: {km:.3f} s every {every} iterations "
            f"({km / every * 1000:.2f} ms per iteration amortised)"
        )
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
