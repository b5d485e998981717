"""Seed-honest ablation of the plug-ins: every plug-in subset trained with every seed, one table.

    python -m toco.train.ablate --out work_dirs/ablation --seeds 0 1 2  # synthetic set, 15 runs
    python -m toco.train.ablate --out abl --subsets base ppc all --seeds 0 1 2 \\
        --config configs/voc_vit_b.yaml --data-root VOCdevkit/VOC2012

Every training flag of train.py is accepted and passed to every run (e.g. `--max-iters 600` for a
shorter ablation); only the plug-in switches, --seed and --work-dir are set per run (runs go to
OUT/<subset>/seed<k>). Subsets: base, all, a plug-in name, or names joined with '+' (ppc+rca).
`--seeds` defaults to the config's seed. Each run happens in its own process (--no-isolate: in
this one), so peak memory is per run: max RSS of the training process on the CPU
(resource.getrusage), torch.cuda.max_memory_allocated on a GPU. A run whose result file exists is
not trained again, so an interrupted ablation resumes where it stopped.

The data path is held fixed by default (`--data-path fixed`): when a subset pairs images (MCIS)
every subset, `base` included, trains on the batches of that pair sampler (or of
`--pair-sampler share_one|random` when given), so a difference to `base` is the plug-in's and
not the resampling's; `--data-path per-subset` lets each run sample as its plug-ins ask. The
table's `batches` column and its notes say which batches each subset saw.

Metrics per run: CAM, aux CAM and segmentation mIoU of the final validation, pseudo-label mIoU (the
PAR-refined training pseudo-label rule on the validation split, toco.evaluation.pseudo), the mean
seconds per iteration over the logging windows after the plug-ins switched on (the first window,
warm-up, left out), the peak memory, and for PPC runs the share of logging windows in which the
semi-hard window dropped the hardest negative prototype at every step (`ppc_hardest_dropped`).
The table gives, per subset, the number of seeds n and
each metric's mean ± sample standard deviation over them, with the difference to `base`; a
difference is marked `*` when it exceeds the seed spread, i.e. |mean - base mean| > std + base
std (needs n >= 2 on both sides; a conservative rule: a run-to-run wobble of one spread on each
side cannot produce it). A second table lists every seed's values. Written to OUT/ablation.md
and OUT/ablation.json (all per-seed values and the statistics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from toco.atomic import write_bytes_atomic
from toco.cli import run_cli
from toco.config import TrainConfig, load_yaml, parse_config, save_config
from toco.errors import ConfigError, UserError
from toco.plugins.registry import plugin_names

# (key, column title, number format); the first four are compared with `base` for significance
METRICS: tuple[tuple[str, str, str], ...] = (
    ("cam_miou", "CAM mIoU", ".2f"),
    ("aux_cam_miou", "aux CAM mIoU", ".2f"),
    ("pseudo_label_miou", "pseudo-label mIoU", ".2f"),
    ("seg_miou", "seg mIoU", ".2f"),
    ("s_per_iter", "s/iter", ".3f"),
    ("peak_memory_mb", "peak memory (MiB)", ".0f"),
    ("ppc_mining_windows", "PPC mining windows", ".2f"),
)
SCORES = tuple(k for k, _, _ in METRICS[:4])


def default_subsets() -> tuple[str, ...]:
    return ("base", *plugin_names(), "all")


def subset_plugins(name: str) -> tuple[str, ...]:
    """'base' -> (), 'all' -> every plug-in, 'ppc+rca' -> ('ppc', 'rca')."""
    plugins = plugin_names()
    if name == "base":
        return ()
    if name == "all":
        return plugins
    parts = tuple(p for p in name.split("+") if p)
    bad = [p for p in parts if p not in plugins]
    if bad or not parts:
        raise ConfigError(
            f"--subsets: unknown subset '{name}' (use base, all, or plug-in names "
            f"{', '.join(plugins)} joined with '+')"
        )
    return tuple(p for p in plugins if p in parts)


def subset_config(
    cfg: TrainConfig, name: str, out: Path, seed: int, pair_sampler: Optional[str] = None
) -> TrainConfig:
    """The run of subset `name` with `seed`, in OUT/<name>/seed<seed>; `pair_sampler` sets
    the training batches of every subset (see `fixed_data_path`)."""
    return dataclasses.replace(
        cfg,
        work_dir=str(out / name / f"seed{seed}"),
        seed=seed,
        plugins=cfg.plugins.with_enabled(subset_plugins(name)),
        pair_sampler=pair_sampler or cfg.pair_sampler,
    ).validate()


def fixed_data_path(cfg: TrainConfig, names: Sequence[str]) -> Optional[str]:
    """The pair sampler every subset trains with when the data path is held fixed: the one set
    by --pair-sampler, else the one a subset's plug-ins ask for (MCIS: its pair_policy), so
    that `base` sees the same batches as the MCIS runs. None when no subset pairs images."""
    from toco.plugins import pair_policy

    if cfg.pair_sampler != "auto":
        return cfg.pair_sampler
    for name in names:
        policy = pair_policy(
            dataclasses.replace(cfg, plugins=cfg.plugins.with_enabled(subset_plugins(name)))
        )
        if policy is not None:
            return policy
    return None


def data_path_note(
    fixed: bool, sampler: Optional[str], names: Sequence[str], cfg: TrainConfig
) -> str:
    """One sentence for the table: which training batches the subsets saw."""
    if sampler is None:
        return "Data path: plain shuffled batches for every subset (no subset pairs images)."
    kind = {"share_one": "image pairs sharing a class", "random": "random image pairs"}[sampler]
    if fixed:
        return (
            f"Data path held fixed: the pair sampler '{sampler}' ({kind}) for every subset, "
            "plug-ins on or off."
        )
    from toco.plugins import pair_policy

    paired = [
        n
        for n in names
        if pair_policy(
            dataclasses.replace(cfg, plugins=cfg.plugins.with_enabled(subset_plugins(n)))
        )
        is not None
    ]
    return (
        f"Data path per subset (--data-path per-subset): {', '.join(paired)} trained on "
        f"{kind}, the others on plain shuffled batches, so their difference mixes the "
        "plug-in with the resampling."
    )


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


def windows_at_one(metrics_path: Path, key: str, from_iter: int) -> Optional[float]:
    """Share of the logging windows from `from_iter` on whose mean of `key` is 1, i.e. in
    which every step had the value 1 (for a per-step 0..1 statistic such as PPC's
    ppc_hardest_dropped); None when no window logged it."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    values = [r[key] for r in records if key in r and r.get("iter", 0) > from_iter]
    if not values:
        return None
    return sum(v >= 1.0 - 1e-9 for v in values) / len(values)


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

    from toco import build
    from toco.build import build_model
    from toco.checkpoint import load_checkpoint, load_weights
    from toco.evaluation.pseudo import evaluate_pseudo_labels
    from toco.runtime import resolve_device
    from toco.train.runner import COMPLETE_MARKER, run_training

    run_dir = Path(cfg.work_dir)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    finished = (run_dir / COMPLETE_MARKER).exists()
    final = (
        json.loads((run_dir / "final.json").read_text())
        if finished
        else run_training(cfg, resume=(run_dir / "checkpoints" / "last.pt").exists())
    )
    wall = time.perf_counter() - tic
    if "stopped" in final:
        raise UserError(f"the {run_dir.name} run stopped early ({final['stopped']})")
    peak = peak_memory_mb(device.type)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt", map_location=device)
    spec = build.dataset_spec(cfg)
    model = build_model(cfg, spec.num_classes, pretrained="none").to(device)
    load_weights(model, state["model"], run_dir / "checkpoints" / "last.pt")
    loader = DataLoader(
        build.eval_dataset(cfg, cfg.val_split), batch_size=1, num_workers=min(cfg.num_workers, 2)
    )
    confusion, coverage = evaluate_pseudo_labels(
        model, loader, spec.num_classes, device, cfg, cfg.val_size or cfg.crop_size
    )
    return {
        "plugins": cfg.plugins.enabled(),
        "seed": cfg.seed,
        "cam_miou": final.get("cam_miou"),
        "aux_cam_miou": final.get("aux_cam_miou"),
        "pseudo_label_miou": confusion.miou(),
        "pseudo_label_coverage": coverage,
        "seg_miou": final.get("seg_miou"),
        "s_per_iter": seconds_per_iter(run_dir / "metrics.jsonl", cfg.plugins.first_start(cfg)),
        "ppc_mining_windows": windows_at_one(
            run_dir / "metrics.jsonl", "ppc_hardest_dropped", cfg.plugins.ppc.start(cfg)
        ),
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "max_rss",
        "iterations": final.get("iterations"),
        "wall_s": wall,
        "work_dir": str(run_dir),
        "config": cfg.to_dict(),
    }


def _run_isolated(cfg: TrainConfig, out: Path, name: str) -> dict[str, Any]:
    cfg_path, result_path = out / f"{name}.config.yaml", out / f"{name}.result.json"
    save_config(cfg, cfg_path)
    code = subprocess.call(
        [
            sys.executable,
            "-m",
            "toco.train.ablate",
            "--run-one",
            str(cfg_path),
            "--result",
            str(result_path),
        ]
    )
    if code != 0 or not result_path.exists():
        raise UserError(f"the '{name}' run failed (exit code {code}); see {cfg.work_dir}")
    return json.loads(result_path.read_text())


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def seed_statistics(runs: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric: n, mean, std (sample, n - 1; None for n < 2) and the per-seed values."""
    out = {}
    for key, _, _ in METRICS:
        values = {seed: r[key] for seed, r in runs.items() if r.get(key) is not None}
        vals = list(values.values())
        out[key] = {
            "n": len(vals),
            "mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "per_seed": values,
        }
    return out


def versus_base(stats: dict[str, Any], base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per score: the difference of the means to base and whether it exceeds the seed spread
    (|diff| > std + base std; None when either side has fewer than 2 seeds)."""
    out = {}
    for key in SCORES:
        a, b = stats[key], base[key]
        if a["mean"] is None or b["mean"] is None:
            continue
        diff = a["mean"] - b["mean"]
        exceeds = None if a["std"] is None or b["std"] is None else abs(diff) > a["std"] + b["std"]
        out[key] = {"diff": diff, "exceeds_seed_spread": exceeds}
    return out


def _cell(stat: dict[str, Any], spec: str, delta: Optional[dict[str, Any]] = None) -> str:
    if stat["mean"] is None:
        return "-"
    text = format(stat["mean"], spec)
    if stat["std"] is not None:
        text += " ± " + format(stat["std"], spec)
    if delta is not None:
        text += f" ({delta['diff']:+{spec}}{'*' if delta['exceeds_seed_spread'] else ''})"
    return text


def write_table(runs: dict[str, dict[int, dict[str, Any]]], out: Path, meta: dict[str, Any]) -> str:
    """ablation.md (summary and per-seed tables) and ablation.json in `out`; returns the
    summary table."""
    stats = {name: seed_statistics(by_seed) for name, by_seed in runs.items()}
    base = stats.get("base")
    titles = [t for _, t, _ in METRICS]
    lines = [
        "| subset | seeds | batches | " + " | ".join(titles) + " | time vs base |",
        "|---|---|---|" + "---|" * (len(titles) + 1),
    ]
    summary: dict[str, Any] = {}
    for name, st in stats.items():
        deltas = versus_base(st, base) if base is not None and name != "base" else {}
        t, tb = st["s_per_iter"]["mean"], base["s_per_iter"]["mean"] if base else None
        ratio = t / tb if t and tb else None
        summary[name] = {"stats": st, "vs_base": deltas, "time_vs_base": ratio}
        cells = [_cell(st[k], spec, deltas.get(k)) for k, _, spec in METRICS]
        n = max(s["n"] for s in st.values())
        time_cell = "-" if ratio is None else f"{(ratio - 1) * 100:+.1f}%"
        batches = meta.get("batches", {}).get(name, "-")
        lines.append(f"| {name} | {n} | {batches} | " + " | ".join(cells) + f" | {time_cell} |")
    text = "\n".join(lines) + "\n"
    per_seed = [
        "| subset | seed | " + " | ".join(titles) + " |",
        "|---|---|" + "---|" * len(titles),
    ]
    for name, by_seed in runs.items():
        for seed, r in sorted(by_seed.items()):
            per_seed.append(
                f"| {name} | {seed} | "
                + " | ".join(_fmt(r.get(k), spec) for k, _, spec in METRICS)
                + " |"
            )
    memory = (
        "CUDA allocator peak" if meta["device"] == "cuda" else "max RSS of the training process"
    )
    notes = (
        f"\nmean ± sample std over the seeds (n = seeds column); (diff) = mean - base mean, "
        f"* = exceeds the seed spread (|diff| > std + base std).\n{meta['dataset']} dataset, "
        f"{meta['backbone']}, {meta['max_iters']} iterations, global batch "
        f"{meta['batch_size']}, crop {meta['crop_size']}, device {meta['device']}, seeds "
        f"{' '.join(map(str, meta['seeds']))}; plug-ins on from iteration "
        f"{meta['plugin_start']}. Peak memory: {memory}.\n{meta['data_path_note']}\n"
    )
    (out / "ablation.md").write_text(text + notes + "\nPer seed:\n\n" + "\n".join(per_seed) + "\n")
    (out / "ablation.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "runs": {n: {str(k): v for k, v in r.items()} for n, r in runs.items()},
            },
            indent=2,
        )
    )
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
        write_bytes_atomic(args.result, json.dumps(result, indent=2).encode())
        return 0

    def extra(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ablation")
        group.add_argument("--out", required=True, help="folder of the runs and the table")
        group.add_argument(
            "--subsets",
            nargs="+",
            default=list(default_subsets()),
            help="plug-in subsets: base, all, a plug-in name, or a+b",
        )
        group.add_argument(
            "--seeds",
            nargs="+",
            type=int,
            default=None,
            help="train every subset with each of these seeds (default: --seed)",
        )
        group.add_argument(
            "--isolate",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="train each subset in its own process (per-run peak memory)",
        )
        group.add_argument(
            "--data-path",
            choices=("fixed", "per-subset"),
            default="fixed",
            help="fixed: every subset trains on the batches of one sampler (the "
            "MCIS pair sampler when a subset has MCIS, or --pair-sampler), so a "
            "difference is the plug-in's alone; per-subset: each run samples as "
            "its plug-ins ask (MCIS runs on pairs, the others not)",
        )

    cfg, args = parse_config(argv, extra)
    out = Path(args.out)
    names = list(dict.fromkeys(args.subsets))
    seeds = list(dict.fromkeys(args.seeds if args.seeds else [cfg.seed]))
    fixed = args.data_path == "fixed"
    sampler = fixed_data_path(cfg, names)
    configs = {
        (name, seed): subset_config(cfg, name, out, seed, sampler if fixed else None)
        for name in names
        for seed in seeds
    }
    from toco.plugins import pair_policy

    batches = {
        name: f"pairs {pair_policy(configs[name, seeds[0]])}"
        if pair_policy(configs[name, seeds[0]])
        else "plain"
        for name in names
    }
    out.mkdir(parents=True, exist_ok=True)
    from toco.runtime import resolve_device

    device = resolve_device(cfg.device)
    runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in names}
    for (name, seed), sub in configs.items():
        tag = f"{name}.seed{seed}"
        result_path = out / f"{tag}.result.json"
        if result_path.exists():
            runs[name][seed] = json.loads(result_path.read_text())
            if runs[name][seed].get("config") != sub.to_dict():
                raise UserError(
                    f"{result_path} comes from a different configuration; "
                    "choose another --out (or delete it)"
                )
            continue
        print(
            f"== ablation: {name} ({', '.join(subset_plugins(name)) or 'no plug-in'}), seed {seed}",
            flush=True,
        )
        if args.isolate:
            runs[name][seed] = _run_isolated(sub, out, tag)
        else:
            runs[name][seed] = run_one(sub)
            write_bytes_atomic(result_path, json.dumps(runs[name][seed], indent=2).encode())
    meta = {
        "dataset": cfg.dataset,
        "backbone": cfg.backbone,
        "max_iters": cfg.max_iters,
        "batch_size": cfg.batch_size,
        "crop_size": cfg.crop_size,
        "device": device.type,
        "seeds": seeds,
        "plugin_start": cfg.plugins.first_start(cfg),
        "isolated": args.isolate,
        "data_path": args.data_path,
        "pair_sampler": sampler,
        "batches": batches,
        "data_path_note": data_path_note(fixed, sampler, names, cfg),
        "command": "python -m toco.train.ablate " + " ".join(argv),
    }
    print(write_table(runs, out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
