"""Long-run stability: the built-in recipe trained with N seeds, short schedule.

    python -m scripts.stability                          # 10 seeds x the recipe's schedule
    python -m scripts.stability --seeds 2 --max-iters 20 --threads 1   # a quick check
    python -m scripts.stability --config configs/voc_vit_b.yaml --data-root VOC2012 --max-iters 2000

Per seed: how many steps had a non-finite loss (the run uses `--nonfinite skip`, so it goes on
and counts them) or a non-finite gradient (checked before every optimizer step), and the final
validation mIoU of the CAMs and of the segmentation head. Then the mIoU spread over seeds.
Prints a table and writes JSON. Extra flags go to every run (e.g. --ppc). A seed whose run
folder already holds a result is not retrained, so an interrupted sweep continues.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from toco.atomic import write_bytes_atomic
from toco.cli import ArgumentParser, run_cli
from toco.config import parse_config

MIOU_KEYS = ("cam_miou", "seg_miou")


class GradientWatch:
    """Counts optimizer steps whose gradients hold a NaN/inf (a global optimizer hook)."""

    def __init__(self) -> None:
        self.steps = 0
        self.nonfinite = 0
        self.first: int | None = None
        self._handle = register_optimizer_step_pre_hook(self._check)

    def _check(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        if not finite:
            self.nonfinite += 1
            self.first = self.steps if self.first is None else self.first
        self.steps += 1

    def close(self) -> None:
        self._handle.remove()


def train_one(seed: int, run_dir: Path, max_iters: int | None, extra: list[str]) -> dict[str, Any]:
    from toco.train.runner import run_training

    result_file = run_dir / "stability.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    schedule = [] if max_iters is None else ["--max-iters", str(max_iters)]
    cfg, _ = parse_config(
        [*extra, *schedule, "--seed", str(seed), "--nonfinite", "skip", "--work-dir", str(run_dir)]
    )
    # Validate and checkpoint only at the end: the figure is about the run, not its curve.
    cfg.eval_every = cfg.save_every = cfg.max_iters
    watch = GradientWatch()
    tic = time.perf_counter()
    try:
        final = run_training(cfg)
    finally:
        watch.close()
    result = {
        "seed": seed,
        "iterations": final["iterations"],
        "nonfinite_loss_steps": final["skipped_steps"],
        "nonfinite_grad_steps": watch.nonfinite,
        "first_nonfinite_grad_step": watch.first,
        **{k: final.get(k) for k in MIOU_KEYS},
        "minutes": (time.perf_counter() - tic) / 60,
    }
    write_bytes_atomic(result_file, json.dumps(result, indent=2).encode())  # reread on rerun
    return result


def machine() -> dict[str, Any]:
    """Where the figure was measured (it goes into the README with it)."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "max": max(values),
        "range": max(values) - min(values),
    }


def table(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        "| seed | non-finite loss steps | non-finite grad steps | CAM mIoU | seg mIoU | min |",
        "|-----:|------:|------:|------:|------:|-----:|",
    ]
    for r in results:
        lines.append(
            f"| {r['seed']} | {r['nonfinite_loss_steps']} | "
            f"{r['nonfinite_grad_steps']} | {r['cam_miou']:.2f} | "
            f"{r['seg_miou']:.2f} | {r['minutes']:.1f} |"
        )
    for key in MIOU_KEYS:
        s = summary[key]
        lines.append(
            f"{key}: mean {s['mean']:.2f}, std {s['std']:.2f}, "
            f"min {s['min']:.2f}, max {s['max']:.2f} (range {s['range']:.2f})"
        )
    lines.append(
        f"runs with any non-finite loss or gradient: {summary['unstable_runs']} of {len(results)}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--max-iters", type=int, default=None, help="iterations per run (default: the recipe's)"
    )
    parser.add_argument(
        "--work-root", default="work_dirs/stability", help="one run folder per seed below this"
    )
    parser.add_argument("--output-json", default=None, help="default: <work-root>/stability.json")
    args, extra = parser.parse_known_args(argv)
    root = Path(args.work_root)
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        results.append(train_one(seed, root / f"seed{seed}", args.max_iters, extra))
        logging.getLogger("toco").handlers.clear()  # the next run sets up its own log file
    summary = {key: spread([r[key] for r in results]) for key in MIOU_KEYS}
    summary["unstable_runs"] = sum(
        1 for r in results if r["nonfinite_loss_steps"] or r["nonfinite_grad_steps"]
    )
    report = {
        "machine": machine(),
        "flags": extra,
        "max_iters": args.max_iters,
        "runs": results,
        "summary": summary,
    }
    out = Path(args.output_json or root / "stability.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(results, summary))
    print(f"machine: {report['machine']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
