"""A whole training run: data and model set-up, the loop, validation, logging and checkpoints."""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from toco import data
from toco.builders import build_model, resolve_device
from toco.checkpoint import load_checkpoint, save_checkpoint
from toco.config import TrainConfig, save_config
from toco.engine import Trainer, build_loss_modules, validate
from toco.errors import UserError
from toco.metrics import ConfusionMatrix, format_iou_table

log = logging.getLogger("toco")

COMPLETE_MARKER = "COMPLETE"


def setup_logging(run_dir: Path | None) -> None:
    """Console + (when given) run_dir/train.log, concise format."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if run_dir is not None:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def infinite_batches(loader: DataLoader, sampler_gen: torch.Generator, seed: int,
                     start_epoch: int = 0) -> Iterator[dict]:
    """Endless iteration: epoch e shuffles with seed + e, so the order is reproducible."""
    epoch = start_epoch
    while True:
        sampler_gen.manual_seed(seed + epoch)
        yield from loader
        epoch += 1


def iou_tables(results: dict[str, ConfusionMatrix], class_names: list[str]) -> tuple[str, dict]:
    """Text table (CAM | aux CAM | seg per class) and a JSON-friendly summary."""
    table = format_iou_table(class_names, {k: r.iou() for k, r in results.items()})
    summary = {k: {"miou": r.miou(),
                   "iou": {c: (None if np.isnan(v) else float(v) * 100)
                           for c, v in zip(class_names, r.iou().tolist())}}
               for k, r in results.items()}
    return table, summary


class MetricsWriter:
    """Appends one JSON object per line; the dashboard-independent record of a run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def run_training(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train with `cfg`; returns the final validation summary.

    Everything that can fail on user input (data, backbone, checkpoint) is checked before the
    run folder is created, and the folder only gets its COMPLETE marker at the very end.
    """
    setup_logging(None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Denormal optimizer/activation values make CPU float maths up to 20x slower.
    torch.set_flush_denormal(True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    spec = data.dataset_spec(cfg)
    train_set = data.train_dataset(cfg)
    val_set = data.eval_dataset(cfg, cfg.val_split)
    model = build_model(cfg, spec.num_classes).to(device)
    trainer = Trainer(cfg, model, build_loss_modules(cfg), device)

    run_dir = Path(cfg.work_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    start_iter = 0
    if resume:
        if not ckpt_path.exists():
            raise UserError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path, map_location=device)
        start_iter = load_training_state(trainer, state)
    elif (run_dir / COMPLETE_MARKER).exists() or ckpt_path.exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or "
                        "choose another --work-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    setup_logging(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    log.info("torch %s on %s; %d train / %d val images; %s", torch.__version__, device,
             len(train_set), len(val_set), cfg.backbone)

    sampler_gen = torch.Generator()
    per_device_batch = cfg.batch_size
    loader = DataLoader(train_set, batch_size=per_device_batch, shuffle=True, drop_last=True,
                        num_workers=cfg.num_workers, generator=sampler_gen,
                        worker_init_fn=data.seed_worker, persistent_workers=cfg.num_workers > 0,
                        pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise UserError(f"the training split has {len(train_set)} images, fewer than the "
                        f"batch size {cfg.batch_size}")
    val_loader = DataLoader(val_set, batch_size=1, shuffle=False, num_workers=cfg.num_workers)
    batches = infinite_batches(loader, sampler_gen, cfg.seed, start_epoch=start_iter // len(loader))
    for _ in range(start_iter % len(loader)):
        next(batches)

    running: dict[str, list[float]] = defaultdict(list)
    summary: dict[str, Any] = {}
    tic = time.perf_counter()
    for it in range(start_iter, cfg.max_iters):
        logged = trainer.train_step(next(batches), it)
        for k, v in logged.items():
            running[k].append(v)
        done = it + 1
        if done % cfg.log_every == 0 or done == cfg.max_iters:
            elapsed = time.perf_counter() - tic
            rate = (done - start_iter) / elapsed
            means = {k: float(np.mean(v)) for k, v in running.items()}
            eta = (cfg.max_iters - done) / max(rate, 1e-9)
            log.info("iter %d/%d  %s  %.2f s/it  eta %s", done, cfg.max_iters,
                     "  ".join(f"{k} {v:.4g}" for k, v in means.items()), 1 / rate,
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
            metrics.write({"iter": done, "s_per_iter": 1 / rate, **means})
            running.clear()
        if done % cfg.eval_every == 0 or done == cfg.max_iters:
            results = validate(model, val_loader, spec.num_classes, device,
                               cfg.val_size or cfg.crop_size, cfg.val_scales, cfg.bkg_thre)
            table, summary = iou_tables(results, list(spec.class_names))
            log.info("validation at iteration %d (%s split)\n%s", done, cfg.val_split, table)
            (run_dir / f"val_iter{done:06d}.txt").write_text(table + "\n")
            metrics.write({"iter": done, "val": summary})
        if done % cfg.save_every == 0 or done == cfg.max_iters:
            save_checkpoint(training_state(trainer, done), ckpt_path)
    final = {"iterations": cfg.max_iters, **{f"{k}_miou": v["miou"] for k, v in summary.items()},
             "validation": summary}
    (run_dir / "final.json").write_text(json.dumps(final, indent=2))
    (run_dir / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return final


def training_state(trainer: Trainer, iteration: int) -> dict[str, Any]:
    """Everything needed to evaluate (model + config) and to resume (optimizer, RNGs)."""
    return {
        "model": trainer.model.state_dict(),
        "loss_modules": trainer.loss_modules.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "iteration": iteration,
        "config": trainer.cfg.to_dict(),
        "crop_rng": trainer.crop_rng.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
    }


def load_training_state(trainer: Trainer, state: dict[str, Any]) -> int:
    trainer.model.load_state_dict(state["model"])
    trainer.loss_modules.load_state_dict(state.get("loss_modules", {}))
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.crop_rng.set_state(state["crop_rng"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["iteration"])
