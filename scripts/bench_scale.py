"""Start-up, COCO mask preparation and evaluation memory on generated trees of real dataset size.

    # trees (generated, never committed; sizes default to the real datasets')
    python -m scripts.bench_scale generate coco --root /scratch/coco_big   # 82,783 + 5,000 val
    python -m scripts.bench_scale generate voc --root /scratch/voc_big     # 10,582 train_aug
    python -m scripts.bench_scale generate coco-val --root /scratch/coco_val   # 40,137 val
    # measurements (each prints a markdown table; --json writes it too)
    python -m scripts.bench_scale startup --dataset coco --root /scratch/coco_big
    python -m scripts.bench_scale startup --dataset voc --root /scratch/voc_big
    python -m scripts.bench_scale prepare --root /scratch/coco_big --workers 1 2
    python -m scripts.bench_scale eval-rss --root /scratch/coco_val

- startup: `train.py` with the dataset's recipe (tiny random ViT: the model is not what is
  measured) stopped after iteration 1, twice: with an empty cache folder (COCO: masks prepared,
  label caches built; VOC: masks scanned) and again with the caches present. Reported: seconds
  from launch to the log line of iteration 1, and the peak RSS of the process.
- prepare: `python -m datasets.coco prepare --subsets train2014` into a fresh folder for each
  --workers count: masks/s, masks/s per worker, peak RSS (the largest process).
- eval-rss: `evaluate.py` (seg mode, train-val protocol at --size 64, a tiny random checkpoint
  written first) over the first 1,000 val images and over all of them: peak RSS of each and
  the growth (the issue's bound: under 10%).

Peak RSS (MiB) is the kernel's max RSS of the measured process or of the largest of its waited-for
children (wait4): the largest single process, not the sum over loader or pool workers. The COCO
pictures default to 96x128 (82,783 real-size JPEGs need ~5 GB); masks, instances and headers are of
real count, and --image-size 480 640 gives real-size pictures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.gpu_report import SMOKE_MODEL
from scripts.realsize import (
    COCO_TRAIN_IMAGES,
    COCO_VAL_EVAL_IMAGES,
    VOC_HW,
    VOC_TRAIN_AUG_IMAGES,
    write_coco_tree,
    write_voc_tree,
)
from scripts.timing import machine_line
from toco.atomic import write_bytes_atomic
from toco.errors import UserError

REPO = Path(__file__).resolve().parents[1]
VOC_VAL_IMAGES = 1_449
COCO_SMALL_HW = (96, 128)
ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def run_measured(
    cmd: list[str], marker: str | None = None, timeout: float = 3600
) -> dict[str, Any]:
    """Run `cmd` (cwd: the repository); wall seconds, seconds until a stdout line contains
    `marker`, peak RSS (MiB) of the process and its waited-for children, and the last lines."""
    tic = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, lines = None, []
    deadline = tic + timeout
    for line in proc.stdout:
        lines.append(line.rstrip())
        if seen is None and marker and marker in line:
            seen = time.perf_counter() - tic
        if time.perf_counter() > deadline:
            proc.kill()
            break
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - tic,
        "marker_seconds": seen,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "tail": lines[-8:],
    }


def checked(result: dict[str, Any], what: str) -> dict[str, Any]:
    if result["returncode"] != 0:
        raise UserError(
            f"{what} failed (exit {result['returncode']}): " + " | ".join(result["tail"][-3:])
        )
    return result


# ------------------------------------------------------------------------------------------
# generate


def generate(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root)
    hw = tuple(args.image_size) if args.image_size else None
    progress = (lambda n: print(f"  {n} images", flush=True)) if not args.quiet else None
    tic = time.perf_counter()
    if args.what == "coco":
        counts = {
            "train2014": args.count or COCO_TRAIN_IMAGES,
            "val2014": args.val_count if args.val_count is not None else 5_000,
        }
        if counts["val2014"] < 1:
            raise UserError(
                "generate coco: --val-count must be at least 1 (train.py builds "
                "its val_part split from val2014)"
            )
        write_coco_tree(root, counts, hw or COCO_SMALL_HW, progress=progress)
    elif args.what == "coco-val":
        counts = {"train2014": 8, "val2014": args.count or COCO_VAL_EVAL_IMAGES}
        write_coco_tree(root, counts, hw or (48, 64), progress=progress)
    else:
        count = args.count or VOC_TRAIN_AUG_IMAGES
        val = min(args.val_count if args.val_count is not None else VOC_VAL_IMAGES, count)
        write_voc_tree(
            root, count, hw or VOC_HW, splits={"train_aug": None, "val": val}, progress=progress
        )
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {
        "what": args.what,
        "root": str(root),
        "seconds": time.perf_counter() - tic,
        "bytes": size,
    }


# ------------------------------------------------------------------------------------------
# startup


def train_command(dataset: str, root: Path, cache: Path, work: Path) -> list[str]:
    recipe = {"coco": "configs/coco_vit_b.yaml", "voc": "configs/voc_vit_b.yaml"}[dataset]
    return [
        sys.executable,
        "train.py",
        "--config",
        recipe,
        "--data-root",
        str(root),
        "--cache-dir",
        str(cache),
        "--work-dir",
        str(work),
        "--pretrained",
        "none",
        *SMOKE_MODEL,
        "--max-iters",
        "2",
        "--stop-at",
        "1",
        "--log-every",
        "1",
        "--warmup-iters",
        "1",
        "--seg-start-iter",
        "1",
        "--contrast-start-iter",
        "0",
        "--aux-cam-until-iter",
        "0",
        "--num-workers",
        "0",
    ]


def startup(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(args.scratch or Path(args.root).parent / "bench_scale_runs")
    cache = scratch / f"cache-{args.dataset}"
    shutil.rmtree(cache, ignore_errors=True)  # the first start meets no cache
    runs = {}
    for name in ("first", "cached"):
        work = scratch / f"startup-{args.dataset}-{name}"
        shutil.rmtree(work, ignore_errors=True)
        r = checked(
            run_measured(
                train_command(args.dataset, Path(args.root), cache, work), marker="iter 1/"
            ),
            f"train.py ({name} start)",
        )
        runs[name] = {k: r[k] for k in ("marker_seconds", "seconds", "peak_rss_mib")}
    return {"dataset": args.dataset, "root": args.root, "runs": runs}


# ------------------------------------------------------------------------------------------
# prepare


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(args.scratch or Path(args.root).parent / "bench_scale_runs")
    ann = Path(args.root) / "annotations" / "instances_train2014.json"
    masks = len(json.loads(ann.read_bytes())["images"])
    runs = {}
    for workers in args.workers:
        out = scratch / f"prepared-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        r = checked(
            run_measured(
                [
                    sys.executable,
                    "-m",
                    "datasets.coco",
                    "prepare",
                    "--data-root",
                    str(args.root),
                    "--out",
                    str(out),
                    "--subsets",
                    "train2014",
                    "--workers",
                    str(workers),
                ]
            ),
            f"prepare --workers {workers}",
        )
        # its own timing line ("train2014: N masks, S s -> out"): no interpreter start-up
        found = re.search(r"train2014: (\d+) masks, ([\d.]+) s", "\n".join(r["tail"]))
        if not found or int(found[1]) != masks:
            raise UserError(
                f"prepare --workers {workers}: no timing line for {masks} masks in "
                f"its output: {' | '.join(r['tail'][-3:])}"
            )
        seconds = float(found[2])
        rate = masks / seconds
        runs[str(workers)] = {
            "seconds": seconds,
            "process_seconds": r["seconds"],
            "masks_per_s": rate,
            "masks_per_s_per_worker": rate / workers,
            "peak_rss_mib": r["peak_rss_mib"],
        }
        shutil.rmtree(out, ignore_errors=True)
    return {"root": args.root, "masks": masks, "runs": runs}


# ------------------------------------------------------------------------------------------
# eval-rss


def tiny_checkpoint(root: Path, cache: Path, work: Path) -> Path:
    """A 1-iteration tiny COCO run on the tree (its val2014 gets prepared on the way)."""
    ckpt = work / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        checked(run_measured(train_command("coco", root, cache, work)), "train.py (checkpoint)")
    return ckpt


def eval_rss(args: argparse.Namespace) -> dict[str, Any]:
    from datasets.coco import prepared_dir

    root = Path(args.root)
    scratch = Path(args.scratch or root.parent / "bench_scale_runs")
    cache = scratch / "cache-eval"
    ckpt = tiny_checkpoint(root, cache, scratch / "eval-checkpoint")
    splits = prepared_dir(root, cache) / "ImageSets" / "Segmentation"
    names = (splits / "val.txt").read_text().split()
    first = min(args.first, len(names))
    write_bytes_atomic(splits / f"val_first{first}.txt", ("\n".join(names[:first]) + "\n").encode())
    runs = {}
    for split, count in ((f"val_first{first}", first), ("val", len(names))):
        r = checked(
            run_measured(
                [
                    sys.executable,
                    "evaluate.py",
                    "--checkpoint",
                    str(ckpt),
                    "--data-root",
                    str(root),
                    "--cache-dir",
                    str(cache),
                    "--split",
                    split,
                    "--size",
                    str(args.size),
                    "--device",
                    "cpu",
                    "--workers",
                    str(args.eval_workers),
                ]
            ),
            f"evaluate {split}",
        )
        runs[str(count)] = {"seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"]}
    small, full = runs[str(first)], runs[str(len(names))]
    extra = len(names) - first  # the rate of the images beyond the first (no start-up in it)
    marginal = extra / (full["seconds"] - small["seconds"]) if extra else None
    return {
        "root": args.root,
        "images": len(names),
        "first": first,
        "runs": runs,
        "growth": full["peak_rss_mib"] / small["peak_rss_mib"] - 1,
        "images_per_s_beyond_first": marginal,
    }


# ------------------------------------------------------------------------------------------


def markdown(command: str, r: dict[str, Any]) -> str:
    if command == "generate":
        return f"generated {r['what']} in {r['seconds']:.0f} s, {r['bytes'] / 2**20:.0f} MiB"
    if command == "startup":
        rows = [
            f"| {k} | {v['marker_seconds']:.1f} | {v['seconds']:.1f} | {v['peak_rss_mib']:.0f} |"
            for k, v in r["runs"].items()
        ]
        return "\n".join(
            [
                f"start-up, {r['dataset']} ({r['root']})",
                "",
                "| start | s to iteration 1 | s total | peak RSS MiB |",
                "|---|---|---|---|",
                *rows,
            ]
        )
    if command == "prepare":
        rows = [
            f"| {k} | {v['seconds']:.1f} | {v['masks_per_s']:.0f} | "
            f"{v['masks_per_s_per_worker']:.0f} | {v['peak_rss_mib']:.0f} |"
            for k, v in r["runs"].items()
        ]
        return "\n".join(
            [
                f"prepare train2014, {r['masks']} masks",
                "",
                "| workers | s | masks/s | per worker | peak RSS MiB |",
                "|---|---|---|---|---|",
                *rows,
            ]
        )
    rows = [f"| {k} | {v['seconds']:.1f} | {v['peak_rss_mib']:.0f} |" for k, v in r["runs"].items()]
    rate = r["images_per_s_beyond_first"]
    return "\n".join(
        [
            f"evaluation peak RSS, {r['images']} val images: growth "
            f"{100 * r['growth']:+.1f}% from the first {r['first']}"
            + (f"; {rate:.1f} images/s beyond them" if rate else ""),
            "",
            "| images | s (process) | peak RSS MiB |",
            "|---|---|---|",
            *rows,
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write a tree")
    g.add_argument("what", choices=["coco", "voc", "coco-val"])
    g.add_argument("--root", required=True)
    g.add_argument("--count", type=int, help="images (default: the real dataset's)")
    g.add_argument("--val-count", type=int, help="val images (coco: val2014, voc: val split)")
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    g.add_argument("--quiet", action="store_true")
    s = sub.add_parser("startup", help="time to the first iteration, empty and warm caches")
    s.add_argument("--dataset", choices=["coco", "voc"], required=True)
    s.add_argument("--root", required=True)
    r = sub.add_parser("prepare", help="COCO masks/s per --workers count")
    r.add_argument("--root", required=True)
    r.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    e = sub.add_parser("eval-rss", help="evaluation peak RSS, first images vs all")
    e.add_argument("--root", required=True, help="a tree from `generate coco-val`")
    e.add_argument("--first", type=int, default=1000)
    e.add_argument("--size", type=int, default=64, help="evaluate.py --size (speed only)")
    e.add_argument("--eval-workers", type=int, default=2)
    for q in (s, r, e):
        q.add_argument("--scratch", help="work and cache folders (default: next to --root)")
    for q in (g, s, r, e):
        q.add_argument("--json", help="also write the result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = {"generate": generate, "startup": startup, "prepare": prepare, "eval-rss": eval_rss}[
        args.command
    ](args)
    result["machine"] = machine_line()
    print(markdown(args.command, result))
    if args.json:
        write_bytes_atomic(Path(args.json), json.dumps(result, indent=2).encode())
    return 0


if __name__ == "__main__":
    from toco.cli import run_cli

    sys.exit(run_cli(lambda: main(sys.argv[1:])))
