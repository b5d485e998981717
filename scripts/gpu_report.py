"""One prepared GPU report: training, loader, evaluation and bf16-vs-fp32 figures in <= 8 minutes.

    python -m scripts.gpu_report                       # on a GPU machine -> work_dirs/gpu_report
    python -m scripts.gpu_report --smoke --out /tmp/r  # every part at a tiny size on the CPU

Parts, in this order, each in its own process with its own time budget (seconds, on a GPU):

- train_fp32 (60): scripts/benchmark.py at configs/voc_vit_b.yaml (ViT-B/16, random weights,
  crop 448, batch 4): s/it, images/s, peak memory; fp32 with TF32 matmuls as the recipe
- train_bf16 (45): the same with --amp bf16
- eval (70): scripts/bench_eval.py: images/s of train-val and voc-ms, each with and without
  CRF, 500x375
- loader (45): scripts/bench_data.py at the VOC recipe on generated 500x375 JPEGs, 0 .. all CPU
  cores as workers
- agreement (110): configs/synthetic.yaml for 300 iterations in fp32 and in bf16 (same seed):
  logged losses and final mIoU side by side
- train_bf16_compile (140): train_bf16 with --compile default (slow first steps while it
  compiles)

The whole report stops at --total seconds (default 470): each part gets the smaller of its budget
and the time left, and a part that overruns is killed and recorded as `timed out`, as is one
that crashes (with the end of its log). After every part, report.json and report.md in --out are
rewritten atomically, so an interrupted report keeps what it measured. logs/<part>.log holds
each part's own output. The targets of the issue (>= 20 images/s fp32, >= 45 bf16, <= 20 GB
peak) are printed beside the training figures. With --smoke every part runs on the CPU at a
tiny size (tests/test_gpu_report.py), so that the GPU run works the first time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from toco.atomic import write_bytes_atomic

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"train_fp32": 20.0, "train_bf16": 45.0, "train_bf16_compile": 45.0}
PEAK_TARGET_GB = 20.0
BUDGETS = {
    "train_fp32": 60,
    "train_bf16": 45,
    "eval": 70,
    "loader": 45,
    "agreement": 110,
    "train_bf16_compile": 140,
}
SMOKE_BUDGET = 90  # seconds per part on the CPU (each takes a few)
# a tiny model on the CPU, for --smoke (every flag below is a train.py flag)
SMOKE_MODEL = [
    "--backbone",
    "vit_tiny_patch16_224",
    "--backbone-depth",
    "2",
    "--aux-layer",
    "0",
    "--crop-size",
    "64",
    "--local-crop-size",
    "32",
    "--num-local-crops",
    "2",
    "--batch-size",
    "2",
    "--decoder-dim",
    "16",
    "--cam-scales",
    "1.0",
    "0.5",
    "--val-scales",
    "1.0",
    "--par-iters",
    "2",
    "--par-dilations",
    "1",
    "2",
    "--val-size",
    "64",
    "--loss-group-size",
    "0",
    "--threads",
    "1",
]


# ------------------------------------------------------------------------------------------
# The parts: each returns a JSON-able dict (run in a child process by `run_part`).


def train_part(amp: str, compile_mode: str) -> Callable[[argparse.Namespace], dict]:
    def run(args: argparse.Namespace) -> dict:
        from scripts import benchmark

        argv = [
            "--config",
            str(REPO / "configs/voc_vit_b.yaml"),
            "--pretrained",
            "none",
            "--data-root",
            "unused",
            "--device",
            args.device,
            "--amp",
            amp,
            "--compile",
            compile_mode,
        ]
        if args.smoke:
            argv += SMOKE_MODEL + [
                "--iters",
                "1",
                "--rounds",
                "1",
                "--warmup",
                "1",
                "--compile-backend",
                "eager",
            ]
        else:
            argv += [
                "--iters",
                "5",
                "--rounds",
                "2",
                "--warmup",
                "3" if compile_mode != "none" else "2",
            ]
        return benchmark.main(argv)

    return run


def eval_part(args: argparse.Namespace) -> dict:
    from scripts import bench_eval

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        argv = ["--device", args.device, "--protocols", "train-val", "voc-ms", "--json", str(out)]
        if args.smoke:
            argv += [
                "--backbone",
                "vit_tiny_patch16_224",
                "--image-size",
                "48",
                "64",
                "--images",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "1",
                "--threads",
                "1",
            ]
        else:
            argv += ["--images", "10", "--repeats", "2", "--warmup", "2"]
        bench_eval.main(argv)
        return json.loads(out.read_text())


def loader_part(args: argparse.Namespace) -> dict:
    from scripts import bench_data

    cores = os.cpu_count() or 1
    workers = sorted({0, 1, max(1, cores // 4), max(1, cores // 2), cores})
    argv = ["--recipes", "voc", "--root", str(Path(args.out) / "data")]
    if args.smoke:
        argv += ["--workers", "0", "1", "--images", "4", "--batches", "1", "--profile-samples", "2"]
    else:
        argv += ["--workers", *map(str, workers), "--images", "64", "--batches", "20"]
    return bench_data.main(argv)


def agreement_part(args: argparse.Namespace) -> dict:
    """The same run of the synthetic recipe in fp32 and bf16: logged losses, final mIoU."""
    from toco.config import parse_config
    from toco.train.runner import run_training

    base = Path(args.out) / "agreement"
    iters = 4 if args.smoke else 300
    common = [
        "--config",
        str(REPO / "configs/synthetic.yaml"),
        "--device",
        args.device,
        "--cache-dir",
        str(Path(args.out) / "data" / "cache"),
        "--max-iters",
        str(iters),
        "--eval-every",
        str(iters),
        "--save-every",
        str(iters),
        "--log-every",
        "1" if args.smoke else "25",
    ]
    if args.smoke:
        common += SMOKE_MODEL + [
            "--seg-start-iter",
            "2",
            "--warmup-iters",
            "1",
            "--synthetic-train",
            "8",
            "--synthetic-val",
            "2",
            "--batch-size",
            "4",
        ]
    else:  # the samples do not depend on the worker count (SeededSamples)
        common += ["--num-workers", "4"]
    runs = {}
    for amp in ("none", "bf16"):
        work = base / amp
        cfg, _ = parse_config([*common, "--amp", amp, "--work-dir", str(work)])
        tic = time.perf_counter()
        final = run_training(cfg)
        logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
        runs["fp32" if amp == "none" else amp] = {
            "seconds": time.perf_counter() - tic,
            "losses": [
                {
                    k: v
                    for k, v in r.items()
                    if k not in ("lr", "s_per_iter", "img_per_s", "gpu_mem_gb")
                }
                for r in logged
                if "val" not in r
            ],
            "miou": {k: v for k, v in final.items() if k.endswith("_miou")},
        }
    return {"iterations": iters, "recipe": "configs/synthetic.yaml", "runs": runs}


PARTS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "train_fp32": train_part("none", "none"),
    "train_bf16": train_part("bf16", "none"),
    "eval": eval_part,
    "loader": loader_part,
    "agreement": agreement_part,
    "train_bf16_compile": train_part("bf16", "default"),
}


def run_part(args: argparse.Namespace) -> int:
    """Child process: one part, its result written atomically to parts/<name>.json."""
    result = PARTS[args.part](args)
    write_json(Path(args.out) / "parts" / f"{args.part}.json", result)
    return 0


# ------------------------------------------------------------------------------------------
# The report: parts in child processes, results merged after each.


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(payload, indent=2).encode())


def machine() -> dict[str, Any]:
    import platform

    import torch

    from scripts.timing import machine_line

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "line": machine_line(),
        "gpu": gpu,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def launch(name: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """Run part `name` in a child process; its status, seconds and result (or None)."""
    out = Path(args.out)
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "scripts.gpu_report",
        "--part",
        name,
        "--out",
        str(out),
        "--device",
        args.device,
    ] + (["--smoke"] if args.smoke else [])
    (out / "parts" / f"{name}.json").unlink(missing_ok=True)
    tic = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the part and its loader workers
            proc.wait()
            status = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - tic
    part_file = out / "parts" / f"{name}.json"
    result = json.loads(part_file.read_text()) if part_file.is_file() else None
    entry = {"status": status, "seconds": seconds, "budget_s": timeout, "result": result}
    if status != "ok":
        entry["log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
    return entry


def report(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    deadline = time.perf_counter() + args.total
    state: dict[str, Any] = {
        "machine": machine(),
        "smoke": args.smoke,
        "device": args.device,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "parts": {},
    }
    for name in args.parts:
        left = deadline - time.perf_counter()
        if left < 5:
            state["parts"][name] = {"status": "skipped (no time left)", "result": None}
            continue
        budget = SMOKE_BUDGET if args.smoke else BUDGETS[name]
        print(f"[gpu_report] {name}: budget {min(budget, left):.0f} s", flush=True)
        state["parts"][name] = launch(name, args, min(budget, left))
        print(
            f"[gpu_report] {name}: {state['parts'][name]['status']} in "
            f"{state['parts'][name]['seconds']:.0f} s",
            flush=True,
        )
        write_json(out / "report.json", state)
        write_bytes_atomic(out / "report.md", markdown(state).encode())
    print(markdown(state))
    return state


# ------------------------------------------------------------------------------------------
# Markdown


def markdown(state: dict[str, Any]) -> str:
    m, parts = state["machine"], state["parts"]
    lines = [
        f"# GPU report ({'smoke, CPU' if state['smoke'] else state['device']})",
        "",
        f"{m['line']}; GPU {m['gpu'] or 'none'}; started {state['started']}",
        "",
        "| part | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['status']} | {v.get('seconds', 0):.0f} |" for k, v in parts.items()]
    train = [(k, v["result"]) for k, v in parts.items() if k.startswith("train") and v["result"]]
    if train:
        c = train[0][1]["config"]
        lines += [
            "",
            f"## Training step, configs/voc_vit_b.yaml ({c['backbone']}, random "
            f"weights, crop {c['crop_size']}, batch {c['batch_size']})",
            "",
            "| run | s/it | images/s | target images/s | peak GB | bare backbone s/it |",
            "|---|---|---|---|---|---|",
        ]
        for k, r in train:
            ok = "met" if r["train_images_per_s"] >= TARGETS[k] else "NOT met"
            peak = r["peak_memory_gb"]
            peak_note = (
                ""
                if r["peak_memory_kind"] != "cuda max allocated"
                else (" (met)" if peak <= PEAK_TARGET_GB else " (over 20)")
            )
            tf32 = r["config"]["tf32"] and r["machine"]["device"].startswith("cuda")
            name = "fp32 (TF32 matmuls)" if k == "train_fp32" and tf32 else k.removeprefix("train_")
            lines.append(
                f"| {name} | {r['train_s_per_iter']:.3f} | "
                f"{r['train_images_per_s']:.1f} | >= {TARGETS[k]:.0f} ({ok}) | "
                f"{peak:.2f}{peak_note} | {r['bare_backbone_s_per_iter']:.3f} |"
            )
    loader = (parts.get("loader") or {}).get("result")
    if loader:
        r = loader["recipes"]["voc"]
        lines += [
            "",
            f"## Training loader, VOC recipe, 500x375 JPEGs ({loader['cpu_cores']} CPU cores)",
            "",
            "| workers | images/s | per worker |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {v:.1f} | {r['images_per_s_per_worker'][k]:.1f} |"
            for k, v in r["images_per_s"].items()
        ]
    ev = (parts.get("eval") or {}).get("result")
    if ev:
        lines += [
            "",
            f"## Evaluation, {ev['image_size'][1]}x{ev['image_size'][0]}, batch 1",
            "",
            "| configuration | images/s | peak MiB |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['configuration']} | {r['images_per_s']:.2f} | {r['peak_memory_mib']:.0f} |"
            for r in ev["results"]
        ]
    agree = (parts.get("agreement") or {}).get("result")
    if agree:
        fp32, bf16 = agree["runs"]["fp32"], agree["runs"]["bf16"]
        lines += [
            "",
            f"## bf16 vs fp32, {agree['recipe']}, {agree['iterations']} iterations",
            "",
            "fp32 with the recipe's TF32 setting on a GPU.",
            "",
            "| iteration | total loss fp32 | total loss bf16 | difference |",
            "|---|---|---|---|",
        ]
        for a, b in zip(fp32["losses"], bf16["losses"]):
            lines.append(
                f"| {a['iter']} | {a['total']:.4f} | {b['total']:.4f} | "
                f"{b['total'] - a['total']:+.4f} |"
            )
        lines += ["", "| final mIoU | fp32 | bf16 |", "|---|---|---|"]
        lines += [
            f"| {k} | {fp32['miou'][k]:.2f} | {bf16['miou'].get(k, float('nan')):.2f} |"
            for k in fp32["miou"]
        ]
        lines.append(f"\nrun time: fp32 {fp32['seconds']:.0f} s, bf16 {bf16['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        default="work_dirs/gpu_report",
        help="folder of report.json, report.md, logs (work_dirs/ is git-ignored)",
    )
    p.add_argument("--smoke", action="store_true", help="every part tiny, on the CPU")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--total", type=float, default=470, help="seconds for the whole report")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from toco.errors import ConfigError

            raise ConfigError("gpu_report: no CUDA device here (use --smoke for the CPU check)")
    state = report(args)
    return 0 if all(p["status"] == "ok" for p in state["parts"].values()) else 1


if __name__ == "__main__":
    from toco.cli import run_cli

    sys.exit(run_cli(lambda: main(sys.argv[1:])))
