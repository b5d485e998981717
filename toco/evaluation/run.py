"""The evaluation command: one streaming pass over a split, sharded over processes.

Each process (one, or N under torchrun) scores every N-th image and writes that image's
files; only confusion matrices and pixel counts are kept, so memory does not grow with the
number of images. The matrices and counts are summed across processes before any score is
computed, and rank 0 alone writes the JSON, the split list, the archive and the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from datasets.files import image_size, save_palette_png, write_bytes_atomic
from toco.errors import ConfigError, DataError, UserError
from toco.evaluation.protocol import (
    PSEUDO_CRF,
    SEG_CRF,
    Protocol,
    apply_crf,
    build_protocol,
    seg_prediction,
)
from toco.evaluation.pseudo import PseudoLabelScores, pseudo_labels
from toco.evaluation.report import image_score, pick_extremes, write_report
from toco.evaluation.submission import pack_submission, submission_png, verify_submission
from toco.method.inference import class_score_map
from toco.method.metrics import ConfusionMatrix, format_iou_table

MODES = ("seg", "cam", "pseudo")


@dataclass
class EvalRequest:
    """What evaluate.py was asked to do (its flags, see `python evaluate.py --help`)."""

    checkpoint: str
    mode: str = "seg"
    protocol: str = "train-val"
    split: Optional[str] = None
    dataset: Optional[str] = None
    data_root: Optional[str] = None
    cache_dir: Optional[str] = None
    scales: Optional[list[float]] = None
    flip: Optional[bool] = None
    size: Optional[int] = None
    flip_fusion: Optional[str] = None
    scale_fusion: Optional[str] = None
    patch_fit: str = "pad"
    bkg_thre: Optional[float] = None
    crf: bool = False
    crf_backend: str = "torch"
    device: str = "auto"
    amp: str = "none"
    workers: int = 2
    output_json: Optional[str] = None
    save_dir: Optional[str] = None
    save_logits: Optional[str] = None
    predict_only: bool = False
    submission: Optional[str] = None
    report: Optional[str] = None
    report_images: int = 4

    def check(self) -> None:
        """Flag combinations that cannot work, refused before anything is loaded or written."""
        from toco.method.crf import pydensecrf_available

        if self.crf and self.mode == "cam":
            raise ConfigError(
                "--crf refines segmentation predictions or pseudo labels: use it "
                "with --mode seg or --mode pseudo"
            )
        if self.crf and self.crf_backend == "pydensecrf" and not pydensecrf_available():
            raise ConfigError(
                "--crf-backend pydensecrf needs pydensecrf2: pip install "
                "'cython<3' && pip install --no-build-isolation pydensecrf2"
            )
        if self.submission:
            if self.mode != "seg" or not self.save_dir:
                raise ConfigError(
                    "--submission needs --mode seg and --save-dir DIR (the "
                    "archive is written there)"
                )
            self.predict_only = True
        if self.predict_only and (self.mode == "cam" or not self.save_dir):
            raise ConfigError(
                "--predict-only needs --mode seg and --save-dir DIR (or --mode "
                "pseudo with --save-dir)"
            )
        if self.save_logits and self.mode != "seg":
            raise ConfigError("--save-logits dumps segmentation logits: use it with --mode seg")
        if self.report and self.predict_only:
            raise ConfigError(
                "--report needs ground-truth masks: drop --predict-only / "
                "--submission, or choose a split with masks"
            )
        if self.report_images < 1:
            raise ConfigError(f"--report-images must be >= 1, got {self.report_images}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")


class Predictor:
    """Predictions of one checkpoint under one protocol, per batch of one image."""

    def __init__(
        self,
        model,
        cfg,
        protocol: Protocol,
        mode: str,
        bkg_thre: float,
        use_aux_cam: bool,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
    ) -> None:
        from toco.method.par import PAR

        self.model, self.cfg, self.protocol, self.mode = model, cfg, protocol, mode
        self.bkg_thre, self.use_aux_cam = bkg_thre, use_aux_cam
        self.par = PAR(cfg.par_iters, cfg.par_dilations).to(device)
        self.device_type, self.amp_dtype = device.type, amp_dtype

    def autocast(self):
        """The forward passes' precision; CAM maths, PAR, the CRF and argmax stay fp32."""
        return torch.autocast(
            self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    def cams(self, image: Tensor) -> tuple[Tensor, Tensor]:
        with self.autocast():
            cam, cam_aux = self.protocol.cams(self.model, image)
        return cam.float(), cam_aux.float()

    def pseudo(self, image: Tensor, cls_label: Tensor, crf: bool) -> Tensor:
        refine = None
        if crf:

            def refine(img: Tensor, probs: Tensor) -> Tensor:
                return apply_crf(self.protocol, img, probs, PSEUDO_CRF)

        with self.autocast():
            return pseudo_labels(
                self.model,
                image,
                cls_label,
                self.cfg,
                self.par,
                size=self.protocol.size,
                use_aux_cam=self.use_aux_cam,
                cam_scales=self.protocol.cam_scales,
                patch_fit=self.protocol.patch_fit,
                crf=refine,
            )

    def __call__(
        self, image_u8: Tensor, cls_label: Tensor
    ) -> tuple[dict[str, Tensor], Optional[Tensor]]:
        """({name: (B, H, W) labels}, seg logits or None); the first name is the main one."""
        from toco.method.inference import cams_to_prediction

        image = image_u8.float().div(255)
        if self.mode == "seg":
            with self.autocast():
                logits = self.protocol.seg_logits(self.model, image).float()
            return {"seg": seg_prediction(self.protocol, logits, image_u8)}, logits
        if self.mode == "cam":
            cam, cam_aux = self.cams(image)
            return {
                "cam": cams_to_prediction(cam, cls_label, self.bkg_thre),
                "aux_cam": cams_to_prediction(cam_aux, cls_label, self.bkg_thre),
            }, None
        return {"pseudo": self.pseudo(image, cls_label, bool(self.protocol.crf))}, None


def _output_path(req: EvalRequest, name: str) -> Optional[Path]:
    """Where the main prediction of image `name` is written, if anywhere."""
    if not req.save_dir:
        return None
    root = Path(req.save_dir)
    if req.submission:
        return submission_png(root, name)
    if req.mode == "pseudo":
        return root / "SegmentationClassAug" / f"{name}.png"
    return root / f"{name}.png"


def run_evaluation(req: EvalRequest) -> Optional[dict[str, Any]]:
    """Evaluate; returns the JSON record on rank 0 (None on the other ranks)."""
    from toco.distributed import cleanup_distributed, init_distributed
    from toco.runtime import resolve_device

    req.check()
    device = resolve_device(req.device)
    info = init_distributed(device.type)
    try:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        return _evaluate(req, device, info)
    finally:
        cleanup_distributed()


@dataclass
class Setup:
    """The loaded run, data and protocol of one evaluation."""

    state: dict[str, Any]
    cfg: Any
    spec: Any
    split: str
    protocol: Protocol
    dataset: Any
    predict: Predictor


def _setup(req: EvalRequest, device: torch.device) -> Setup:
    from toco import build
    from toco.build import build_model
    from toco.checkpoint import load_weights
    from toco.config import TrainConfig
    from toco.export import load_model_state, with_training_heads
    from toco.runtime import configure_precision, resolve_amp

    state = load_model_state(req.checkpoint, map_location=device)  # checkpoint or release
    overrides = {
        k: v
        for k, v in (
            ("dataset", req.dataset),
            ("data_root", req.data_root),
            ("cache_dir", req.cache_dir),
        )
        if v is not None
    }
    cfg = TrainConfig.from_saved({**state["config"], **overrides})
    spec = build.dataset_spec(cfg)
    if req.submission and spec.num_classes != 21:
        raise ConfigError(
            f"--submission voc needs a 21-class model; this one has "
            f"{spec.num_classes} ({cfg.dataset})"
        )
    scale_overrides = (
        {"cam_scales": req.scales, "cam_flip": req.flip}
        if req.mode != "seg"
        else {"scales": req.scales, "flip": req.flip}
    )
    protocol = build_protocol(
        req.protocol,
        cfg,
        req.mode,
        size=req.size,
        flip_fusion=req.flip_fusion,
        scale_fusion=req.scale_fusion,
        patch_fit=req.patch_fit,
        crf=req.crf_backend if req.crf else None,
        crf_params=PSEUDO_CRF if req.mode == "pseudo" else SEG_CRF,
        **scale_overrides,
    )
    split = req.split or spec.val_split
    try:
        dataset = build.eval_dataset(cfg, split, with_masks=not req.predict_only)
    except DataError as err:
        if req.predict_only or "mask" not in str(err):
            raise
        raise DataError(
            f"{err} (a split without masks is predicted, not scored: "
            "--predict-only --save-dir DIR, or --submission voc)"
        ) from None
    configure_precision(dataclasses.replace(cfg, num_workers=req.workers), device)
    model = build_model(cfg, spec.num_classes, pretrained="none").to(device)
    load_weights(model, with_training_heads(model, state["model"]), req.checkpoint)
    model.eval()
    predict = Predictor(
        model,
        cfg,
        protocol,
        req.mode,
        cfg.bkg_thre if req.bkg_thre is None else req.bkg_thre,
        use_aux_cam=int(state.get("iteration", 0)) < cfg.aux_cam_until_iter,
        device=device,
        amp_dtype=resolve_amp(cfg.amp if req.amp == "run" else req.amp, device),
    )
    return Setup(state, cfg, spec, split, protocol, dataset, predict)


class Tally:
    """What a pass keeps: confusion matrices, pixel counts and (for a report) image scores."""

    def __init__(
        self, mode: str, num_classes: int, device: torch.device, keep_image_scores: bool
    ) -> None:
        self.mode, self.num_classes = mode, num_classes
        names = {"seg": ["seg"], "cam": ["cam", "aux_cam"], "pseudo": []}[mode]
        self.matrices = {k: ConfusionMatrix(num_classes, device=device) for k in names}
        self.pseudo = PseudoLabelScores(num_classes, device)
        if mode == "pseudo":  # both views of the same labels, the first is the main number
            self.matrices = {"pseudo": self.pseudo.ignored, "pseudo_strict": self.pseudo.strict}
        self.image_scores: Optional[list[tuple[int, str, float]]] = (
            [] if keep_image_scores else None
        )

    def update(self, preds: dict[str, Tensor], mask: Tensor, index: int, name: str) -> None:
        if self.mode == "pseudo":
            self.pseudo.update(preds["pseudo"], mask)
        else:
            for key, pred in preds.items():
                self.matrices[key].update(pred, mask)
        if self.image_scores is not None:
            main = next(iter(preds.values()))
            self.image_scores.append(
                (
                    index,
                    name,
                    image_score(main[0].cpu().numpy(), mask[0].cpu().numpy(), self.num_classes),
                )
            )

    def all_reduce_(self, world_size: int) -> None:
        """Sum over processes (no-op in one process); image scores are gathered to all."""
        if world_size <= 1:
            return
        if self.mode == "pseudo":
            self.pseudo.all_reduce_()  # its two matrices and the coverage counts
        else:
            for matrix in self.matrices.values():
                matrix.all_reduce_()
        if self.image_scores is not None:
            parts: list = [None] * world_size
            torch.distributed.all_gather_object(parts, self.image_scores)
            self.image_scores = [item for part in parts for item in part]

    def table(self, class_names: list[str]) -> str:
        return format_iou_table(class_names, {k: m.iou() for k, m in self.matrices.items()})

    def scores(self, class_names: list[str]) -> dict[str, Any]:
        """The record's score fields (mIoU in percent, per-class IoU, mode-specific extras)."""
        main = next(iter(self.matrices.values()))
        out: dict[str, Any] = {
            "miou": main.miou(),
            "iou": {
                c: (None if math.isnan(v) else v * 100)
                for c, v in zip(class_names, main.iou().tolist())
            },
        }
        if self.mode == "cam":
            out["aux_cam_miou"] = self.matrices["aux_cam"].miou()
        if self.mode == "pseudo":
            out["coverage"] = self.pseudo.coverage
            out["miou_uncertain_as_miss"] = self.pseudo.strict.miou()
        return out


def _stream(req: EvalRequest, setup: Setup, info, device: torch.device, tally: Tally) -> None:
    """This process's share of the split: predict, score and write each image, keep nothing."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    shard = range(info.rank, len(setup.dataset), info.world_size)
    loader = DataLoader(
        Subset(setup.dataset, shard),
        batch_size=1,
        shuffle=False,
        num_workers=req.workers,
        pin_memory=device.type == "cuda",
    )
    bar = tqdm(
        loader,
        total=len(loader),
        desc=f"{req.mode} {setup.split}",
        unit="img",
        disable=None if info.is_main else True,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    with torch.no_grad():
        for index, batch in zip(shard, bar):
            name = str(batch["name"][0])
            preds, logits = setup.predict(
                batch["image"].to(device), batch["cls_label"].to(device).float()
            )
            if "mask" in batch:
                tally.update(preds, batch["mask"].to(device), index, name)
            out = _output_path(req, name)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                save_palette_png(next(iter(preds.values()))[0].byte().cpu().numpy(), out)
            if req.save_logits and logits is not None:
                Path(req.save_logits).mkdir(parents=True, exist_ok=True)
                np.save(Path(req.save_logits) / f"{name}.npy", logits[0].half().cpu().numpy())
    bar.close()


def _agree_on_failure(info, device: torch.device, failed: bool) -> None:
    """Every rank learns whether any rank failed its pass, so none waits forever for a rank
    that has stopped (e.g. on an unreadable image in its shard)."""
    if not info.enabled:
        return
    flag = torch.tensor([float(failed)], device=device)
    torch.distributed.all_reduce(flag)
    if flag.item() > 0 and not failed:
        raise UserError("evaluation stopped: another process failed (its error is printed above)")


def _evaluate(req: EvalRequest, device: torch.device, info) -> Optional[dict[str, Any]]:
    from toco.evaluation.provenance import provenance

    setup = _setup(req, device)
    cfg, protocol, split, dataset = setup.cfg, setup.protocol, setup.split, setup.dataset
    tally = Tally(req.mode, setup.spec.num_classes, device, keep_image_scores=bool(req.report))
    try:
        _stream(req, setup, info, device, tally)
    except Exception:
        _agree_on_failure(info, device, failed=True)
        raise
    _agree_on_failure(info, device, failed=False)
    tally.all_reduce_(info.world_size)
    if info.enabled:
        torch.distributed.barrier()  # every rank's files are written
    if not info.is_main:
        return None

    seg = req.mode == "seg"
    precision = str(setup.predict.amp_dtype or "fp32")
    record: dict[str, Any] = {
        "mode": req.mode,
        "protocol": protocol.name,
        "split": split,
        "dataset": cfg.dataset,
        "num_images": len(dataset),
        "scales": list(protocol.seg_scales if seg else protocol.cam_scales),
        "flip": protocol.flip if seg else protocol.cam_flip,
        "size": protocol.size,
        "crf": protocol.crf,
        "checkpoint": str(req.checkpoint),
        "world_size": info.world_size,
        "precision": precision,
    }
    if req.mode == "cam":
        record["bkg_thre"] = setup.predict.bkg_thre
    if req.mode == "pseudo":
        record["cam_source"] = "aux_cam" if setup.predict.use_aux_cam else "cam"
        record["thresholds"] = {"high": cfg.high_thre, "low": cfg.low_thre}
    if not req.predict_only:
        print(tally.table(list(setup.spec.class_names)))
        record.update(tally.scores(list(setup.spec.class_names)))
        print(
            f"mIoU ({req.mode}, {protocol.name}, {split}, {len(dataset)} images): "
            f"{record['miou']:.2f}"
            + (f", coverage {record['coverage']:.3f}" if req.mode == "pseudo" else "")
        )
    record["provenance"] = provenance(
        req.checkpoint,
        setup.state,
        {**protocol.to_dict(), "precision": precision},
        cfg.dataset,
        split,
        len(dataset),
        info.world_size,
        device,
    )
    if req.save_dir:
        _finish_save_dir(req, dataset, split, record)
    if req.report:
        record["report"] = str(_write_report(req, setup, tally, record, device))
        print(f"report: {record['report']}")
    if req.output_json:
        write_bytes_atomic(Path(req.output_json), json.dumps(record, indent=2).encode())
    return record


def _write_report(
    req: EvalRequest, setup: Setup, tally: Tally, record: dict[str, Any], device: torch.device
) -> Path:
    worst, best = pick_extremes(tally.image_scores or [], req.report_images)
    sections = {
        f"Worst {len(worst)} images": [
            _report_row(setup.predict, setup.dataset[i], s, device) for i, _, s in worst
        ],
        f"Best {len(best)} images": [
            _report_row(setup.predict, setup.dataset[i], s, device) for i, _, s in best
        ],
    }
    main = next(iter(tally.matrices.values()))
    title = (
        f"{req.mode} mIoU {record['miou']:.2f} on {setup.cfg.dataset} {setup.split} "
        f"({setup.protocol.name})"
    )
    summary = {k: v for k, v in record.items() if k not in ("iou", "provenance")}
    return write_report(
        Path(req.report),
        title,
        summary,
        list(setup.spec.class_names),
        main.iou().tolist(),
        sections,
    )


def _finish_save_dir(req: EvalRequest, dataset, split: str, record: dict[str, Any]) -> None:
    """Rank 0's part of --save-dir: split list, archive, provenance next to the files."""
    root = Path(req.save_dir)
    if req.mode == "pseudo":
        text = "".join(f"{n}\n" for n in dataset.names).encode()
        write_bytes_atomic(root / "ImageSets" / "Segmentation" / f"{split}.txt", text)
    if req.submission:
        archive = pack_submission(root, root / "results.tar.gz", dataset.names)
        sizes = {n: image_size(dataset.layout.image_path(n)) for n in dataset.names}
        problems = verify_submission(archive, sizes)
        if problems:
            raise UserError(f"the archive {archive} failed its own check: {problems[0]}")
        record["archive"] = str(archive)
        print(f"wrote {archive} ({len(dataset.names)} predictions, checked)")
    elif req.predict_only:
        print(f"wrote {len(dataset.names)} predictions to {root}")
    write_bytes_atomic(root / "evaluation.json", json.dumps(record, indent=2).encode())


def _report_row(
    predict: Predictor, sample: dict[str, Any], score: float, device: torch.device
) -> dict[str, Any]:
    """The five panels of one report image (recomputed: nothing was kept during the pass)."""
    from toco.visualize import heatmap

    image_u8 = sample["image"][None].to(device)
    cls_label = sample["cls_label"][None].to(device).float()
    image = image_u8.float().div(255)
    with torch.no_grad():
        preds, _ = predict(image_u8, cls_label)
        cam, _ = predict.cams(image)
        pseudo = predict.pseudo(image, cls_label, crf=False)
    score_map = class_score_map(cam, cls_label)[0]
    return {
        "name": sample["name"],
        "score": score,
        "panels": {
            "input": sample["image"].permute(1, 2, 0).numpy(),
            "ground truth": sample["mask"].numpy().astype(np.uint8),
            "CAM": heatmap(score_map),
            "pseudo label": pseudo[0].cpu().numpy().astype(np.uint8),
            "prediction": next(iter(preds.values()))[0].cpu().numpy().astype(np.uint8),
        },
    }
