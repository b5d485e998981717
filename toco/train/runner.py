"""A whole training run: set-up, the loop, validation, records, checkpoints and resume."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from toco import build
from toco.atomic import remove_stale_temps
from toco.build import build_loss_modules, build_model, compile_backbone
from toco.checkpoint import check_training_keys, load_checkpoint, load_weights, save_checkpoint
from toco.config import TrainConfig, changed_settings, resumed_config, save_config
from toco.distributed import DistInfo, broadcast_parameters, cleanup_distributed, init_distributed
from toco.errors import ConfigError, UserError, storage_error
from toco.evaluation.preview import dataset_classes, pick_images, run_preview
from toco.evaluation.unmasked import format_scores, validate_without_masks
from toco.method.metrics import ConfusionMatrix, format_iou_table
from toco.plugins import build_plugins, enabled_plugins, pair_policy
from toco.runtime import configure_precision, resolve_device
from toco.train.engine import Trainer, validate
from toco.train.faults import WorkerProgress, dead_worker_error
from toco.train.sampling import (
    PairedResumableSampler,
    ResumableSampler,
    SeededSamples,
    dataset_labels,
)
from toco.train.tracking import Tracker, gpu_memory_gb

log = logging.getLogger("toco")

COMPLETE_MARKER = "COMPLETE"
PREVIEW_FILE = "preview.png"


def setup_logging(run_dir: Optional[Path], is_main: bool = True) -> None:
    """Console + run_dir/train.log on rank 0; other ranks only report warnings."""
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if run_dir is not None and is_main:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def iou_tables(results: dict[str, ConfusionMatrix], class_names: list[str]) -> tuple[str, dict]:
    """Text table (one column per result, IoU per class) and a JSON-friendly summary."""
    table = format_iou_table(class_names, {k: r.iou() for k, r in results.items()})
    summary = {
        k: {
            "miou": r.miou(),
            "iou": {
                c: (None if np.isnan(v) else float(v) * 100)
                for c, v in zip(class_names, r.iou().tolist())
            },
        }
        for k, r in results.items()
    }
    return table, summary


class StopSignal:
    """SIGTERM/SIGINT ask the loop to stop after the current step (checkpoint, then exit);
    a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_training(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train with `cfg`; returns the final summary (also written to final.json).

    Everything that can fail on user input (data, backbone, checkpoint) is checked before the
    run folder is created, and the folder gets its COMPLETE marker only at the very end.
    A run folder holding an unfinished run is resumed automatically.
    """
    setup_logging(None)
    device = resolve_device(cfg.device)
    info = init_distributed(device.type)
    try:
        return _train(cfg, resume, device, info)
    except OSError as err:  # e.g. the work dir's disk is full or read-only
        raise storage_error(err, resume_hint(Path(cfg.work_dir))) or err from None
    finally:
        cleanup_distributed()


def _train(cfg: TrainConfig, resume: bool, device: torch.device, info: DistInfo) -> dict[str, Any]:
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    run_dir = Path(cfg.work_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    complete = (run_dir / COMPLETE_MARKER).exists()
    if resume and not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt_path}")
    if complete and not resume:
        raise UserError(
            f"{run_dir} already holds a finished run; pass --resume to continue "
            "it (e.g. with a larger --max-iters) or choose another --work-dir"
        )
    state, kept = None, ""
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        check_training_keys(state, ckpt_path)
        cfg, kept = settings_of_resumed_run(cfg, state["config"], resume, ckpt_path)
    if cfg.batch_size % info.world_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} (global) is not divisible by the "
            f"{info.world_size} processes"
        )
    local_batch = cfg.batch_size // info.world_size
    pairs = pair_policy(cfg)  # a plug-in (MCIS) wants batches of image pairs
    if pairs and local_batch % 2:
        who = (
            f"--pair-sampler {cfg.pair_sampler}"
            if cfg.pair_sampler != "auto"
            else f"the plug-ins {', '.join(enabled_plugins(cfg))}"
        )
        raise ConfigError(
            f"{who} pair the images of each per-device batch: {local_batch} "
            f"images per device (--batch-size {cfg.batch_size} over "
            f"{info.world_size} processes) is odd"
        )
    if cfg.loss_group_size and local_batch % cfg.loss_group_size:
        raise ConfigError(
            f"per-device batch {local_batch} is not a multiple of "
            f"--loss-group-size {cfg.loss_group_size}"
        )
    threads_line = configure_precision(cfg, device)
    seed_everything(cfg.seed)

    # The model first: its patch size completes the config checks before any data is built.
    spec = build.dataset_spec(cfg)
    model = build_model(cfg, spec.num_classes).to(device)
    compile_backbone(model, cfg.compile)
    cfg.check_geometry(model.patch_size)
    plugins = build_plugins(cfg, model.backbone.embed_dim, spec.num_classes, info, model)
    loss_modules = build_loss_modules(cfg) + plugins
    check_something_trains(loss_modules)
    train_set = build.train_dataset(cfg)
    # A tagged collection's held-back images may have no masks: validated without them.
    val_set = build.eval_dataset(cfg, cfg.val_split, with_masks=None) if cfg.eval_every else []
    if len(train_set) < cfg.batch_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} exceeds the {len(train_set)} usable "
            f"training images: use --batch-size <= {len(train_set)}"
        )
    trainer = Trainer(cfg, model, loss_modules, device, info)

    start_iter, wandb_id = 0, None
    if state is not None:
        start_iter, wandb_id = restore(trainer, state, ckpt_path)
        del state
    broadcast_parameters(model, info)
    broadcast_parameters(trainer.loss_modules, info)  # plug-in heads and memories

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(ckpt_path)  # left by a run killed while writing its checkpoint
        (run_dir / COMPLETE_MARKER).unlink(missing_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    setup_logging(run_dir, info.is_main)
    tracker = (
        Tracker(
            run_dir,
            cfg.to_dict(),
            cfg.wandb,
            cfg.wandb_project,
            cfg.wandb_name,
            cfg.wandb_tags,
            resume_id=wandb_id,
        )
        if info.is_main
        else None
    )
    log.info(
        "torch %s, %s x%d, amp %s, %d train / %d val images, %s, global batch %d",
        torch.__version__,
        device,
        info.world_size,
        trainer.amp_dtype or "fp32",
        len(train_set),
        len(val_set),
        cfg.backbone,
        cfg.batch_size,
    )
    log.info(
        "recipe %s; fidelity: dormant terms %s, reg gradient %s, CTC log term %s, "
        "PAR input %s, PTC box %s, local-view flip %s, image labels from %s",
        cfg.recipe or "none (built-in defaults and flags)",
        cfg.dormant_terms,
        cfg.reg_gradient,
        "on" if cfg.ctc_negative_term else "off",
        cfg.par_input,
        cfg.ptc_box,
        cfg.local_view_flip,
        cfg.image_labels,
    )
    log.info("%s, %d data-loader worker(s)", threads_line, cfg.num_workers)
    if start_iter:
        log.info("resuming from %s at iteration %d", ckpt_path, start_iter)
    if kept:
        log.warning("--resume: keeping the stored run's %s", kept)
    for warning in cfg.schedule_warnings(model.patch_size):
        log.warning("warning: %s", warning)

    if pairs:  # MCIS: each per-rank batch is anchor/partner pairs sharing a class
        sampler = PairedResumableSampler(
            dataset_labels(train_set),
            local_batch,
            cfg.seed,
            info.rank,
            info.world_size,
            start_iter,
            pairs,
        )
    else:
        sampler = ResumableSampler(
            len(train_set), local_batch, cfg.seed, info.rank, info.world_size, start_iter
        )
    progress = WorkerProgress(SeededSamples(train_set, cfg.seed), cfg.num_workers)
    # Loaders draw their workers' base seed from their own generator, not the global RNG:
    # a resumed run creates its iterator at another iteration than an uninterrupted one.
    loader = DataLoader(
        progress,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )
    val_shard = Subset(val_set, range(info.rank, len(val_set), info.world_size))
    val_workers = min(cfg.num_workers, 2) if cfg.eval_every else 0
    # Validation runs every eval_every iterations: keep its workers instead of re-forking.
    val_loader = DataLoader(
        val_shard,
        batch_size=1,
        shuffle=False,
        num_workers=val_workers,
        persistent_workers=val_workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )

    running: dict[str, list[float]] = defaultdict(list)
    summary: dict[str, Any] = {}
    preview_indices = (
        pick_images(dataset_classes(val_set), cfg.preview_images) if cfg.eval_every else []
    )
    preview = None
    done = start_iter
    batches = None
    with (
        StopSignal() as stop,
        _dead_workers_reported(run_dir, progress, train_set, lambda: (done, batches)),
    ):
        batches = iter(loader)
        tic = time.perf_counter()
        for it in range(start_iter, cfg.max_iters):
            logged = trainer.train_step(next(batches), it)
            done = it + 1
            for k, v in logged.items():
                running[k].append(v)
            if done % cfg.log_every == 0 or done == cfg.max_iters:
                tic = _log_progress(cfg, running, done, tic, device, tracker)
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_iters):
                val_tic = time.perf_counter()
                if val_set.with_masks:
                    results, panels = validate(
                        model,
                        val_loader,
                        spec.num_classes,
                        device,
                        cfg.val_size or cfg.crop_size,
                        cfg.val_scales,
                        cfg.bkg_thre,
                        info,
                        trainer.autocast,
                        num_panels=cfg.num_vis if tracker and tracker.run else 0,
                    )
                    table, summary = iou_tables(results, list(spec.class_names))
                    log.info(
                        "validation at iteration %d (%s split)\n%s",
                        done,
                        cfg.val_split or spec.val_split,
                        table,
                    )
                    if tracker:
                        (run_dir / f"val_iter{done:06d}.txt").write_text(table + "\n")
                        tracker.log_validation(summary, spec.class_names, done, panels)
                else:
                    summary = _validate_without_masks(
                        model, val_loader, cfg, spec, device, info, trainer, done, run_dir, tracker
                    )
                if tracker:
                    preview = run_preview(
                        model,
                        val_set,
                        preview_indices,
                        cfg,
                        device,
                        cfg.val_size or cfg.crop_size,
                        run_dir / PREVIEW_FILE,
                        spec.class_names,
                        f"{run_dir.name}, iteration {done}",
                        trainer.autocast,
                    )
                tic += time.perf_counter() - val_tic
            stopping = stop.received or (cfg.stop_at is not None and done >= cfg.stop_at)
            if done % cfg.save_every == 0 or done == cfg.max_iters or stopping:
                rng_states = trainer.crop_rng_states()  # every rank: a collective
                if info.is_main:
                    save_checkpoint(training_state(trainer, done, tracker, rng_states), ckpt_path)
            if stopping:
                break
    if done < cfg.max_iters:
        why = stop.received or f"--stop-at {cfg.stop_at}"
        log.info("stopped at iteration %d (%s); checkpoint saved, resume with --resume", done, why)
        if tracker:
            tracker.finish()
        return {"iterations": done, "stopped": why}
    final = {
        "iterations": done,
        "skipped_steps": trainer.skipped_steps,
        **{f"{k}_miou": v["miou"] for k, v in summary.items() if "miou" in v},
        "validation": summary,
    }
    if tracker:
        tracker.summary({k: v for k, v in final.items() if k != "validation"})
        tracker.finish()
        (run_dir / "final.json").write_text(json.dumps(final, indent=2))
        (run_dir / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        scores = ", ".join(f"{k} {v['miou']:.2f}" for k, v in summary.items() if "miou" in v)
        log.info("finished %d iterations in %s: mIoU %s", done, run_dir, scores or "not measured")
        if preview is not None:
            log.info("pictures of %d validation images: %s", len(preview_indices), preview)
    return final


def _validate_without_masks(
    model: Any,
    loader: DataLoader,
    cfg: TrainConfig,
    spec: Any,
    device: torch.device,
    info: DistInfo,
    trainer: Trainer,
    done: int,
    run_dir: Path,
    tracker: Optional[Tracker],
) -> dict[str, Any]:
    """Image-level scores and pseudo-label coverage of held-back images without masks (a
    tagged collection); the table goes to the log, val_iterN.txt and metrics.jsonl."""
    metrics = validate_without_masks(
        model,
        loader,
        cfg,
        device,
        cfg.val_size or cfg.crop_size,
        done < cfg.aux_cam_until_iter,
        info,
        trainer.autocast,
    )
    table = format_scores(metrics)
    log.info(
        "validation at iteration %d (%s split, no masks)\n%s",
        done,
        cfg.val_split or spec.val_split,
        table,
    )
    if tracker:
        (run_dir / f"val_iter{done:06d}.txt").write_text(table + "\n")
        tracker.log({f"val/{k}": v for k, v in metrics.items()}, done)
    return {"image_level": metrics}


def _log_progress(
    cfg: TrainConfig,
    running: dict[str, list[float]],
    done: int,
    tic: float,
    device: torch.device,
    tracker: Optional[Tracker],
) -> float:
    """One concise line: losses, LR, s/it and img/s over the window, ETA; then reset."""
    now = time.perf_counter()
    sec_per_iter = (now - tic) / max(len(running["total"]), 1)
    means = {k: float(np.mean(v)) for k, v in running.items()}
    means["s_per_iter"] = sec_per_iter
    means["img_per_s"] = cfg.batch_size / sec_per_iter
    mem = gpu_memory_gb(device)
    if mem is not None:
        means["gpu_mem_gb"] = mem
    eta = time.strftime("%H:%M:%S", time.gmtime((cfg.max_iters - done) * sec_per_iter))
    losses = "  ".join(f"{k} {means[k]:.4g}" for k in running if k != "lr")
    log.info(
        "iter %d/%d  %s  lr %.3g  %.2f s/it  %.1f img/s  eta %s",
        done,
        cfg.max_iters,
        losses,
        means.get("lr", float("nan")),
        sec_per_iter,
        means["img_per_s"],
        eta,
    )
    if tracker:
        tracker.log(means, done)
    running.clear()
    return now


def training_state(
    trainer: Trainer,
    iteration: int,
    tracker: Optional[Tracker],
    crop_rng_states: Optional[list[torch.Tensor]] = None,
) -> dict[str, Any]:
    """Everything needed to evaluate (model + config) and to resume exactly (every rank's
    crop RNG from `Trainer.crop_rng_states`)."""
    return {
        "model": trainer.model.state_dict(),
        "trainer": trainer.state_dict(crop_rng_states),
        "iteration": iteration,
        "config": trainer.cfg.to_dict(),
        # What each output means, for tools that load the model without the data root.
        "class_names": list(build.dataset_spec(trainer.cfg).class_names),
        "torch_rng": torch.get_rng_state(),
        "wandb_id": tracker.run_id if tracker else None,
    }


@contextlib.contextmanager
def _dead_workers_reported(
    run_dir: Path,
    progress: WorkerProgress,
    train_set: Any,
    loop_state: Callable[[], tuple[int, Any]],
):
    """A loader worker killed by the OS during the loop: one line naming it, exit 2.

    `loop_state()` gives the loop's current (iterations done, loader iterator).
    """
    try:
        yield
    except RuntimeError as err:
        done, batches = loop_state()
        names = getattr(train_set, "names", None)
        raise (
            dead_worker_error(err, batches, progress, names, done, resume_hint(run_dir)) or err
        ) from None


def resume_hint(run_dir: Path) -> str:
    """What is left after a fault, and how to go on."""
    ckpt = run_dir / "checkpoints" / "last.pt"
    if ckpt.is_file():
        return f"the last checkpoint {ckpt} is intact: fix the cause and rerun to resume"
    return "no checkpoint was written yet: fix the cause and rerun to start again"


def check_something_trains(modules: list) -> None:
    """Some loss must be on from iteration 0 (a step with no loss has nothing to backprop);
    activity only switches on over time, so iteration 0 is the one to check."""
    if any(m.active(0) for m in modules):
        return
    later = sorted(
        (m.start_iter, "/".join(m.names) or type(m).__name__) for m in modules if m.weight > 0
    )
    detail = (
        f"the first weighted one, {later[0][1]}, starts at iteration {later[0][0]}"
        if later
        else "every loss weight is 0"
    )
    raise ConfigError(
        f"no loss is active at iteration 0 ({detail}): set --w-cls > 0 or start "
        "a weighted loss at 0 (--contrast-start-iter 0 / --seg-start-iter 0)"
    )


def settings_of_resumed_run(
    cfg: TrainConfig, saved: dict[str, Any], resume: bool, ckpt_path: Path
) -> tuple[TrainConfig, str]:
    """The config an unfinished run continues with; never a mix of two runs' settings.

    Without --resume, a setting that changes results (anything outside RESUMABLE_SETTINGS)
    that differs from the stored run stops the start with one line listing each difference;
    with --resume the stored values are kept and only the resumable settings are taken.
    Returns the config and the list of kept values that differ ("" when none).
    """
    stored = TrainConfig.from_saved(saved, str(ckpt_path))
    changed = changed_settings(stored, cfg)
    if changed and not resume:
        listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"{ckpt_path.parent.parent} holds an unfinished run with other settings ({listing}): "
            "pass --resume to continue it with its own settings (only "
            "max_iters, stop_at, eval/log/save frequency, workers, threads, device and "
            "paths may change), or start a new run with another --work-dir"
        )
    kept = ", ".join(f"{k}={old!r} (not {new!r})" for k, (old, new) in changed.items())
    return resumed_config(stored, cfg), kept


def restore(trainer: Trainer, state: dict[str, Any], path: Path) -> tuple[int, Optional[str]]:
    """Load a training state; returns (iteration, wandb run id). The trainer was built from
    the stored run's settings (`settings_of_resumed_run`), plug-in switches included."""
    load_weights(trainer.model, state["model"], path)
    try:
        trainer.load_state_dict(state["trainer"])
        torch.set_rng_state(state["torch_rng"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(
            f"{path}: its training state does not fit this run (another project "
            f"version or settings?): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    return int(state["iteration"]), state.get("wandb_id")
