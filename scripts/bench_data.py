"""Training-loader throughput per worker process at each recipe, and the time of each transform.

    python -m scripts.bench_data                                  # VOC, COCO, synthetic recipes
    python -m scripts.bench_data --recipes voc --workers 0 1 2 4 8 --batches 40 --json data.json
    python -m scripts.bench_data --images 8 --batches 2 --workers 0 1   # a quick check

For each recipe (configs/voc_vit_b.yaml on 500x375 JPEGs, configs/coco_vit_b.yaml on 640x480
JPEGs in a real COCO root with its instances JSON, configs/synthetic.yaml on the generated set)
the script generates a tree (scripts/realsize.py; into --root, reused when present), builds the
training dataset exactly as train.py does (`toco.build.train_dataset`, `SeededSamples`, the
recipe's crop and scale range) and measures:

- images/s of a `DataLoader` with each --workers count (0 = in the main process), after one
  untimed batch per worker, and images/s divided by the worker count (the per-worker rate);
- the time of each step of a sample (decode, rescale, flip, pad+crop, the three photometric
  views, the resized crop, the uint8 tensors), in the main process, from timing wrappers around
  the dataset's own functions (the samples are unchanged: tests/test_bench_data.py).

A GPU at the VOC recipe needs (its training images/s) / (per-worker images/s) workers, plus a
margin for the time the main process spends collating and pinning. The header names the CPU and
the load average: on a shared CPU the per-worker figure is a floor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader

import datasets.voc as voc_module
from scripts.realsize import COCO_HW, VOC_HW, write_coco_tree, write_voc_tree
from scripts.timing import machine_line
from toco import build
from toco.atomic import write_bytes_atomic
from toco.config import TrainConfig, parse_config
from toco.train.sampling import SeededSamples

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "voc": "configs/voc_vit_b.yaml",
    "coco": "configs/coco_vit_b.yaml",
    "synthetic": "configs/synthetic.yaml",
}
# module-level steps of VOCTrainDataset.__getitem__, looked up in datasets.voc at call time
MODULE_STEPS = {
    "random_scale": "rescale",
    "random_hflip": "flip",
    "random_crop_with_box": "pad + crop",
    "to_uint8_chw": "to uint8 tensors (3)",
}
# the dataset's own callables (instance attributes / methods)
DATASET_STEPS = {
    "read_image": "decode JPEG",
    "local_view": "local view (jitter, grey, blur .5)",
    "main_view": "main view (jitter, grey, blur 1)",
    "resized_crop": "second view: resized crop (bicubic)",
    "second_view": "second view (flip, jitter, grey, blur .1, solarize .2)",
}


@dataclass
class StepTimes:
    """Seconds spent in each named step (summed over calls)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            tic = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tic

        return timed


@contextlib.contextmanager
def timed_steps(dataset: Any, times: StepTimes) -> Iterator[None]:
    """Time every step of `dataset.__getitem__` in this process; everything restored after."""
    saved_module = {n: getattr(voc_module, n) for n in MODULE_STEPS}
    saved_dataset = {n: dataset.__dict__.get(n) for n in DATASET_STEPS}
    try:
        for name, label in MODULE_STEPS.items():
            setattr(voc_module, name, times.wrap(label, saved_module[name]))
        for name, label in DATASET_STEPS.items():
            setattr(dataset, name, times.wrap(label, getattr(dataset, name)))
        yield
    finally:
        for name, fn in saved_module.items():
            setattr(voc_module, name, fn)
        for name, value in saved_dataset.items():
            if value is None:
                delattr(dataset, name)  # a method: drop the instance wrapper
            else:
                setattr(dataset, name, value)


def recipe_config(recipe: str, root: Path, cache: Path) -> TrainConfig:
    """The recipe as train.py reads it, pointed at a generated tree."""
    argv = [
        "--config",
        str(REPO / RECIPES[recipe]),
        "--cache-dir",
        str(cache),
        "--pretrained",
        "none",
    ]
    if recipe == "voc":
        argv += ["--data-root", str(root / "voc")]
    elif recipe == "coco":
        argv += ["--data-root", str(root / "coco")]
    return parse_config(argv)[0]


def ensure_tree(recipe: str, root: Path, images: int) -> None:
    """Generate the recipe's tree under `root` unless a tree of that size is there."""
    if recipe == "voc":
        split = root / "voc" / "ImageSets" / "Segmentation" / "train_aug.txt"
        if not split.is_file() or len(split.read_text().split()) != images:
            write_voc_tree(root / "voc", images, VOC_HW, splits=("train_aug",))
    elif recipe == "coco":
        ann = root / "coco" / "annotations" / "instances_train2014.json"
        if not ann.is_file() or len(json.loads(ann.read_bytes())["images"]) != images:
            write_coco_tree(root / "coco", {"train2014": images}, COCO_HW)


def build_dataset(recipe: str, root: Path, images: int) -> tuple[TrainConfig, Any]:
    """(config, training dataset) of a recipe on its generated tree (`images` samples)."""
    ensure_tree(recipe, root, images)
    cfg = recipe_config(recipe, root, root / "cache")
    if recipe == "synthetic":
        cfg = TrainConfig.from_dict(
            {**cfg.to_dict(), "synthetic_train": images, "synthetic_val": 2}
        )
    return cfg, build.train_dataset(cfg)


def loader_rate(dataset: Any, seed: int, batch_size: int, workers: int, batches: int) -> float:
    """images/s of a DataLoader over SeededSamples (as train.py builds it), after one untimed
    batch per worker (their start-up)."""
    samples = SeededSamples(dataset, seed)
    order = range(batch_size * (batches + max(workers, 1)))  # keys: SeededSamples wraps
    loader = DataLoader(
        samples,
        batch_size=batch_size,
        sampler=order,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )
    it = iter(loader)
    for _ in range(max(workers, 1)):
        next(it)
    tic = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - tic)
    del it
    return rate


def step_profile(dataset: Any, seed: int, count: int) -> dict[str, float]:
    """Mean milliseconds per sample of each step, and of the whole sample, in this process."""
    samples = SeededSamples(dataset, seed)
    samples[0]  # warm-up (first decode, allocator)
    times = StepTimes()
    tic = time.perf_counter()
    with timed_steps(dataset, times):
        for i in range(count):
            samples[i]
    total = time.perf_counter() - tic
    per = {k: 1000 * v / count for k, v in times.seconds.items()}
    per["other (labels, dict, views' PIL copies)"] = 1000 * total / count - sum(per.values())
    per["total"] = 1000 * total / count
    return per


def bench_recipe(recipe: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg, dataset = build_dataset(recipe, Path(args.root), args.images)
    batch = args.batch_size or cfg.batch_size
    profile = step_profile(dataset, cfg.seed, args.profile_samples)
    rates = {}
    for workers in args.workers:
        rates[workers] = statistics.median(
            loader_rate(dataset, cfg.seed, batch, workers, args.batches)
            for _ in range(args.repeats)
        )
    return {
        "recipe": RECIPES[recipe],
        "crop_size": cfg.crop_size,
        "batch_size": batch,
        "scale_range": list(cfg.scale_range),
        "images": len(dataset),
        "image_hw": {"voc": VOC_HW, "coco": COCO_HW}.get(recipe, "synthetic (~160)"),
        "images_per_s": {str(k): v for k, v in rates.items()},
        "images_per_s_per_worker": {str(k): v / max(k, 1) for k, v in rates.items()},
        "ms_per_sample": profile,
    }


def print_tables(result: dict[str, Any]) -> None:
    print(f"# {result['machine']}")
    for name, r in result["recipes"].items():
        print(
            f"\n## {name}: {r['recipe']}, crop {r['crop_size']}, batch {r['batch_size']}, "
            f"images {r['image_hw']}"
        )
        print("| workers | images/s | per worker |\n|---|---|---|")
        for k, v in r["images_per_s"].items():
            print(f"| {k} | {v:.1f} | {r['images_per_s_per_worker'][k]:.1f} |")
        print("\n| step | ms per sample |\n|---|---|")
        for k, v in r["ms_per_sample"].items():
            print(f"| {k} | {v:.1f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="DataLoader worker counts to measure (0 = main process)",
    )
    p.add_argument("--images", type=int, default=64, help="generated images per recipe")
    p.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--repeats", type=int, default=1, help="measurements per count (median)")
    p.add_argument("--profile-samples", type=int, default=16, help="samples timed step by step")
    p.add_argument("--root", default=".cache/bench_data", help="where the trees are generated")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as in a worker process: the main-process rate is comparable
    result = {
        "machine": machine_line(),
        "cpu_cores": os.cpu_count(),
        "recipes": {r: bench_recipe(r, args) for r in args.recipes},
    }
    print_tables(result)
    if args.json:
        write_bytes_atomic(Path(args.json), json.dumps(result, indent=2).encode())
    return result


if __name__ == "__main__":
    from toco.cli import run_cli

    sys.exit(run_cli(lambda: main(sys.argv[1:]) and 0))
