"""Ablation of the seed plug-ins: the same recipe trained with each plug-in subset, one table.

    python -m toco.ablate --out work_dirs/ablation                       # synthetic set, 5 runs
    python -m toco.ablate --out abl --subsets base ppc all --config configs/voc_vit_b.yaml \\
        --data-root VOCdevkit/VOC2012

Every training flag of train.py is accepted and passed to every run; only --ppc/--rca/--mcis and
--work-dir are set per subset (runs go to OUT/<subset>). Subsets: base, ppc, rca, mcis, all, or
names joined with '+' (e.g. ppc+rca). Each run happens in its own process (--no-isolate: in this
one), so peak memory is per run: max RSS of the training process on the CPU
(resource.getrusage), torch.cuda.max_memory_allocated on a GPU. A subset whose result file
exists is not trained again, so an interrupted ablation resumes where it stopped.

Columns: CAM, aux CAM and segmentation mIoU of the final validation, pseudo-label mIoU (the
PAR-refined training pseudo-label rule on the validation split, toco.pseudo_eval), the mean
seconds per iteration over the logging windows after the plug-ins switched on (the first window,
warm-up, left out), its ratio to the base run, and the peak memory. Written to OUT/ablation.md
and OUT/ablation.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from toco.cli import run_cli
from toco.config import TrainConfig, load_yaml, parse_config, save_config
from toco.errors import ConfigError, UserError

PLUGINS = ("ppc", "rca", "mcis")
DEFAULT_SUBSETS = ("base", "ppc", "rca", "mcis", "all")


def subset_plugins(name: str) -> tuple[str, ...]:
    """'base' -> (), 'all' -> every plug-in, 'ppc+rca' -> ('ppc', 'rca')."""
    if name == "base":
        return ()
    if name == "all":
        return PLUGINS
    parts = tuple(p for p in name.split("+") if p)
    bad = [p for p in parts if p not in PLUGINS]
    if bad or not parts:
        raise ConfigError(f"--subsets: unknown subset '{name}' (use base, all, or plug-in names "
                          f"{', '.join(PLUGINS)} joined with '+')")
    return tuple(p for p in PLUGINS if p in parts)


def subset_config(cfg: TrainConfig, name: str, out: Path) -> TrainConfig:
    on = subset_plugins(name)
    return dataclasses.replace(cfg, work_dir=str(out / name),
                               **{p: p in on for p in PLUGINS}).validate()


def seconds_per_iter(metrics_path: Path, from_iter: int) -> Optional[float]:
    """Mean s/iter over the logged windows that start at or after `from_iter` (all windows when
    none does), the very first window left out when there are others."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    windows, prev = [], 0
    for r in records:
        if "s_per_iter" in r:
            if r["iter"] > prev:  # a resumed run logs again from its checkpoint: skip that one
                windows.append((prev, r["iter"] - prev, r["s_per_iter"]))
            prev = r["iter"]
    if len(windows) > 1:
        windows = windows[1:]
    late = [w for w in windows if w[0] >= from_iter]
    use = late or windows
    if not use:
        return None
    return sum(n * s for _, n, s in use) / sum(n for _, n, _ in use)


def peak_memory_mb(device_type: str) -> float:
    """Peak memory of this process: CUDA allocator peak, or max RSS on the CPU (MiB)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB else


def run_one(cfg: TrainConfig) -> dict[str, Any]:
    """Train one subset (resuming an unfinished run), then score its pseudo labels."""
    import torch
    from torch.utils.data import DataLoader

    from toco import data
    from toco.builders import build_model, resolve_device
    from toco.checkpoint import load_checkpoint
    from toco.pseudo_eval import evaluate_pseudo_labels
    from toco.runner import COMPLETE_MARKER, run_training

    run_dir = Path(cfg.work_dir)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    finished = (run_dir / COMPLETE_MARKER).exists()
    final = (json.loads((run_dir / "final.json").read_text()) if finished
             else run_training(cfg, resume=(run_dir / "checkpoints" / "last.pt").exists()))
    wall = time.perf_counter() - tic
    if "stopped" in final:
        raise UserError(f"the {run_dir.name} run stopped early ({final['stopped']})")
    peak = peak_memory_mb(device.type)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt", map_location=device)
    spec = data.dataset_spec(cfg)
    model = build_model(cfg, spec.num_classes, pretrained="none").to(device)
    model.load_state_dict(state["model"])
    loader = DataLoader(data.eval_dataset(cfg, cfg.val_split), batch_size=1,
                        num_workers=min(cfg.num_workers, 2))
    confusion, coverage = evaluate_pseudo_labels(model, loader, spec.num_classes, device, cfg,
                                                 cfg.val_size or cfg.crop_size)
    return {
        "plugins": [p for p in PLUGINS if getattr(cfg, p)],
        "cam_miou": final.get("cam_miou"), "aux_cam_miou": final.get("aux_cam_miou"),
        "pseudo_label_miou": confusion.miou(), "pseudo_label_coverage": coverage,
        "seg_miou": final.get("seg_miou"),
        "s_per_iter": seconds_per_iter(run_dir / "metrics.jsonl", cfg.plugin_start),
        "peak_memory_mb": peak, "peak_memory_kind": "cuda_allocated" if device.type == "cuda"
        else "max_rss", "iterations": final.get("iterations"), "wall_s": wall,
        "work_dir": str(run_dir), "config": cfg.to_dict(),
    }


def _run_isolated(cfg: TrainConfig, out: Path, name: str) -> dict[str, Any]:
    cfg_path, result_path = out / f"{name}.config.yaml", out / f"{name}.result.json"
    save_config(cfg, cfg_path)
    code = subprocess.call([sys.executable, "-m", "toco.ablate", "--run-one", str(cfg_path),
                            "--result", str(result_path)])
    if code != 0 or not result_path.exists():
        raise UserError(f"the '{name}' run failed (exit code {code}); see {cfg.work_dir}")
    return json.loads(result_path.read_text())


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def write_table(rows: dict[str, dict[str, Any]], out: Path, meta: dict[str, Any]) -> str:
    """ablation.md (markdown table) and ablation.json in `out`; returns the markdown."""
    base = rows.get("base", {}).get("s_per_iter")
    lines = [
        "| subset | CAM mIoU | aux CAM mIoU | pseudo-label mIoU | seg mIoU | s/iter | "
        "time vs base | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = (r["s_per_iter"] / base if base and r.get("s_per_iter") else None)
        r["time_vs_base"] = ratio
        lines.append(" | ".join([
            f"| {name}", _fmt(r["cam_miou"]), _fmt(r["aux_cam_miou"]),
            _fmt(r["pseudo_label_miou"]), _fmt(r["seg_miou"]), _fmt(r["s_per_iter"], ".3f"),
            "-" if ratio is None else f"{(ratio - 1) * 100:+.1f}%",
            _fmt(r["peak_memory_mb"], ".0f")]) + " |")
    text = "\n".join(lines) + "\n"
    memory = ("CUDA allocator peak" if meta["device"] == "cuda"
              else "max RSS of the training process")
    notes = (f"\n{meta['dataset']} dataset, {meta['backbone']}, {meta['max_iters']} iterations, "
             f"global batch {meta['batch_size']}, crop {meta['crop_size']}, device "
             f"{meta['device']}; plug-ins on from iteration {meta['plugin_start']}. Peak memory: "
             f"{memory}.\n")
    (out / "ablation.md").write_text(text + notes)
    (out / "ablation.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--run-one" in argv:  # child process of an isolated ablation
        child = argparse.ArgumentParser()
        child.add_argument("--run-one", required=True)
        child.add_argument("--result", required=True)
        args = child.parse_args(argv)
        cfg = TrainConfig.from_dict(load_yaml(args.run_one), args.run_one)
        result = run_one(cfg)
        tmp = Path(args.result + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.result)
        return 0

    def extra(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ablation")
        group.add_argument("--out", required=True, help="folder of the runs and the table")
        group.add_argument("--subsets", nargs="+", default=list(DEFAULT_SUBSETS),
                           help="plug-in subsets: base, ppc, rca, mcis, all, or a+b")
        group.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                           help="train each subset in its own process (per-run peak memory)")

    cfg, args = parse_config(argv, extra)
    out = Path(args.out)
    names = list(dict.fromkeys(args.subsets))
    configs = {name: subset_config(cfg, name, out) for name in names}
    out.mkdir(parents=True, exist_ok=True)
    from toco.builders import resolve_device

    device = resolve_device(cfg.device)
    rows: dict[str, dict[str, Any]] = {}
    for name, sub in configs.items():
        result_path = out / f"{name}.result.json"
        if result_path.exists():
            rows[name] = json.loads(result_path.read_text())
            if rows[name].get("config") != sub.to_dict():
                raise UserError(f"{result_path} comes from a different configuration; "
                                "choose another --out (or delete it)")
            continue
        print(f"== ablation: {name} ({', '.join(subset_plugins(name)) or 'no plug-in'})",
              flush=True)
        if args.isolate:
            rows[name] = _run_isolated(sub, out, name)
        else:
            rows[name] = run_one(sub)
            result_path.write_text(json.dumps(rows[name], indent=2))
    meta = {"dataset": cfg.dataset, "backbone": cfg.backbone, "max_iters": cfg.max_iters,
            "batch_size": cfg.batch_size, "crop_size": cfg.crop_size, "device": device.type,
            "plugin_start": cfg.plugin_start, "isolated": args.isolate,
            "command": "python -m toco.ablate " + " ".join(argv)}
    print(write_table(rows, out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
