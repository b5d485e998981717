"""The training step and validation: dataset batch → model → pseudo labels → losses → update."""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from models.network import IMAGENET_MEAN, IMAGENET_STD, ToCoNet
from toco.config import TrainConfig
from toco.distributed import DistInfo, all_gather_cat, average_gradients
from toco.errors import UserError
from toco.method.cam import (
    box_to_grid,
    cam_to_label,
    cam_to_roi_mask,
    multi_scale_cam,
    refine_cams_with_bkg,
    split_cam_passes,
)
from toco.method.crops import sample_local_crops
from toco.method.inference import (
    cams_to_prediction,
    class_score_map,
    predict_cams,
    predict_seg_logits,
)
from toco.method.metrics import ConfusionMatrix
from toco.method.par import PAR
from toco.method.step import CAM_VIEWS, CTCOutputs, LossModule, StepState
from toco.runtime import resolve_amp
from toco.train.profiling import StageTimer
from toco.train.schedule import build_poly_warmup_scheduler


class NonFiniteLossError(UserError):
    """A loss became NaN or inf; the message names the iteration and the term."""


def build_optimizer(
    model: ToCoNet, cfg: TrainConfig, extra_params: Sequence[torch.nn.Parameter] = ()
) -> torch.optim.AdamW:
    """AdamW over ToCo's four groups (LR x1, x1, x10, x10) or layer-decayed backbone groups
    (toco/train/optim.py); plug-in parameters join the heads."""
    from toco.train.optim import build_adamw

    return build_adamw(model, cfg, extra_params)


def zero_fill_missing_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Give every parameter without a gradient a zero one.

    The official step computes every loss term and multiplies the dormant ones by 0, so the
    parameters only those terms reach (the decoder before the seg loss starts, the CTC head
    before CTC starts on COCO) still take AdamW steps: the step count advances, the moments
    decay and the decoupled weight decay shrinks them. A zero gradient reproduces exactly that
    without running the dormant term's forward and backward passes.
    """
    for p in params:
        if p.grad is None and p.requires_grad:
            p.grad = torch.zeros_like(p)


# utils/imutils.denormalize_img of the official code.
REFERENCE_MEAN_255 = (123.675, 116.28, 103.53)
REFERENCE_STD_255 = (58.395, 57.12, 57.375)


def truncate_like_reference(images: Tensor) -> Tensor:
    """The image PAR sees in the official code (bug B17): ImageNet-normalised, de-normalised
    with the 0-255 constants and cast to uint8 (truncation), over 255. images: [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (images - mean) / std
    # The official 0-255 constants, not std * 255 in float32: that product differs in the last
    # bit and truncated ~3% of a test image's values to a different integer.
    value = normalised * images.new_tensor(REFERENCE_STD_255).view(1, 3, 1, 1) + images.new_tensor(
        REFERENCE_MEAN_255
    ).view(1, 3, 1, 1)
    # The official cast of a value a rounding error below 0 is undefined; clamp makes it 0.
    return value.clamp_(0, 255).to(torch.uint8).float() / 255


def _recording_cams(model: ToCoNet, passes: list[Tensor], images: Tensor) -> tuple[Tensor, Tensor]:
    """model.cams that also keeps each pass's final tokens (for plug-ins reading CAM views)."""
    feats = model.encode(images)
    passes.append(feats.tokens)
    return model.cams_of(feats)


class Trainer:
    """Owns the model, the loss modules, the optimizer and the per-step pseudo-label machinery."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: ToCoNet,
        loss_modules: list[LossModule],
        device: torch.device,
        dist_info: DistInfo = DistInfo(),
    ) -> None:
        self.cfg = cfg
        self.model = model
        # Plug-ins may own parameters and buffers (ToCo's own terms have none).
        self.loss_modules = torch.nn.ModuleList(loss_modules).to(device)
        self.device = device
        self.dist = dist_info
        self.amp_dtype = resolve_amp(cfg.amp, device)
        # A loss scaler is only needed (and only used) for fp16.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.skipped_steps = 0
        self.par = PAR(cfg.par_iters, cfg.par_dilations).to(device)
        extra = [p for m in self.loss_modules for p in m.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg, extra)
        self.scheduler = build_poly_warmup_scheduler(
            self.optimizer, cfg.warmup_iters, cfg.max_iters, cfg.warmup_ratio, cfg.poly_power
        )
        self.crop_rng = torch.Generator(device="cpu").manual_seed(cfg.seed + dist_info.rank)
        self._teacher_updated = False  # by this step's CTC branch
        self.stages = StageTimer(enabled=False, device=device)  # scripts/benchmark.py times

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- pseudo-label providers (called lazily through StepState) ----
    def _pseudo_label(self, state: StepState) -> Tensor:
        with self.stages("pseudo_labels"):
            return self._refined_label(state)

    def _refined_label(self, state: StepState) -> Tensor:
        cfg = self.cfg
        cam = state.cam_aux if state.iteration < cfg.aux_cam_until_iter else state.cam
        with torch.no_grad():  # plug-in hook: e.g. MCIS fuses its co-attention CAMs in
            for module in self.loss_modules:
                if module.active(state.iteration):
                    cam = module.pseudo_label_cam(state, cam)
        valid_cam, _ = cam_to_label(
            cam,
            state.cls_label,
            state.img_box,
            cfg.bkg_thre,
            cfg.high_thre,
            cfg.low_thre,
            ignore_mid=True,
        )
        images = truncate_like_reference(state.images) if cfg.par_input == "uint8" else state.images
        return refine_cams_with_bkg(
            self.par,
            images,
            valid_cam,
            state.cls_label,
            state.img_box,
            cfg.high_thre,
            cfg.low_thre,
            cfg.refine_down_scale,
        )

    def _token_label(self, state: StepState) -> Tensor:
        with self.stages("pseudo_labels"):
            return self._grid_label(state)

    def _grid_label(self, state: StepState) -> Tensor:
        cfg = self.cfg
        grid = state.feats.aux_tokens.shape[-2:]
        cam = F.interpolate(state.cam_aux, size=grid, mode="bilinear", align_corners=False)
        # ptc_box "pixels" is reference bug B1: the pixel box applied unscaled to the grid.
        box = (
            state.img_box
            if cfg.ptc_box == "pixels"
            else box_to_grid(state.img_box, self.model.patch_size)
        )
        return cam_to_label(
            cam, state.cls_label, box, cfg.bkg_thre, cfg.high_thre, cfg.low_thre, ignore_mid=True
        )[1]

    def _ctc(self, state: StepState, view2: Tensor, local_view: Tensor) -> CTCOutputs:
        with self.stages("ctc_views"):
            return self._ctc_views(state, view2, local_view)

    def _ctc_views(self, state: StepState, view2: Tensor, local_view: Tensor) -> CTCOutputs:
        cfg = self.cfg
        roi = cam_to_roi_mask(state.cam_aux, state.cls_label, cfg.low_thre, cfg.high_thre)
        crops, flags = sample_local_crops(
            local_view,
            roi,
            cfg.num_local_crops,
            cfg.local_crop_size,
            cfg.ctc_neg_ratio,
            generator=self.crop_rng,
        )
        b = state.images.shape[0]
        flags = torch.cat([flags.new_ones(b, 2), flags], dim=1)
        cls_view2 = self.model.encode(view2).cls
        cls_local = self.model.encode(crops).cls
        global_cls = torch.cat([state.feats.cls, cls_view2])
        # ToCo updates the EMA teacher before computing its output, with pre-step weights.
        self.model.update_teacher()
        self._teacher_updated = True
        teacher = self.model.project_teacher(global_cls)
        student = self.model.project(torch.cat([global_cls, cls_local]))
        return CTCOutputs(student=student, teacher=teacher, flags=flags)

    # ---- one iteration ----
    def train_step(self, batch: dict, iteration: int) -> dict[str, float]:
        """Forward, losses, backward and optimizer step; returns the unweighted losses.

        A non-finite loss raises NonFiniteLossError before any weight changes, or with
        `nonfinite: skip` the step is dropped (and counted in `skipped_steps`).
        """
        model, cfg, dev = self.model, self.cfg, self.device
        model.train()
        images = batch["image"].to(dev, non_blocking=True).float().div_(255)
        view2 = batch["view2"].to(dev, non_blocking=True).float().div_(255)
        local_view = batch["local_view"].to(dev, non_blocking=True).float().div_(255)
        cls_label = batch["cls_label"].to(dev, non_blocking=True).float()
        img_box = batch["img_box"].to(dev, non_blocking=True).long()

        self._teacher_updated = False
        stage = self.stages
        active = [m for m in self.loss_modules if m.active(iteration)]
        with self.autocast():
            with stage("main_pass"):
                feats = model.encode(images)
                logits, aux_logits = model.classify(feats)
                seg_logits = model.segment(feats) if any(m.needs_decoder for m in active) else None
            with stage("ms_cam"), torch.no_grad():
                # The main pass doubles as the scale-1.0 CAM pass: the model has no dropout,
                # so its tokens are those of a separate no-grad pass.
                own = tuple(m.detach() for m in model.cams_of(feats))
                passes: list[Tensor] = []
                cam_fn = (
                    partial(_recording_cams, model, passes)
                    if any(m.needs_cam_views for m in active)
                    else model.cams
                )
                cam, cam_aux = multi_scale_cam(cam_fn, images, cfg.cam_scales, given=own)
            state = StepState(
                iteration=iteration,
                images=images,
                cls_label=cls_label,
                img_box=img_box,
                feats=feats,
                logits=logits,
                aux_logits=aux_logits,
                seg_logits=seg_logits,
                cam=cam.float(),
                cam_aux=cam_aux.float(),
                make_pseudo_label=self._pseudo_label,
                make_token_label=self._token_label,
                make_ctc=lambda s: self._ctc(s, view2, local_view),
                model=model,
            )
            if passes:
                state.extras[CAM_VIEWS] = split_cam_passes(passes, images.shape[0], cfg.cam_scales)
            losses: dict[str, Tensor] = {}
            total = images.new_zeros(())
            with stage("losses"):
                for module in active:
                    for name, value in module.compute(state).items():
                        losses[name] = value.float()
                        if name in module.stat_names:  # logged only
                            losses[name] = losses[name].detach()
                            continue
                        total = total + module.weight * value.float()
        losses["total"] = total
        if cfg.dormant_terms == "step" and not self._teacher_updated:
            # The official step runs the CTC branch (EMA included) even at weight 0.
            model.update_teacher()
        # One host sync per step: the logged values double as the NaN/inf check.
        values = torch.stack([v.detach() for v in losses.values()]).cpu().tolist()
        logged = dict(zip(losses, values))
        bad = [k for k, v in logged.items() if not math.isfinite(v)]
        if self.dist.enabled:  # every rank must take the same decision
            flag = torch.tensor([float(bool(bad))], device=dev)
            torch.distributed.all_reduce(flag)
            bad = bad or (["total (on another rank)"] if flag.item() > 0 else [])
        if bad:
            message = f"non-finite loss at iteration {iteration}: " + ", ".join(
                f"{k}={logged.get(k, float('nan'))}" for k in bad
            )
            if cfg.nonfinite == "stop":
                raise NonFiniteLossError(
                    message + " (the last checkpoint is intact; "
                    "`--nonfinite skip` drops such steps instead)"
                )
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return {**logged, "skipped": 1.0}
        self.optimizer.zero_grad(set_to_none=True)
        with stage("backward"):
            self.scaler.scale(total).backward()
        with stage("optimizer"):
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if cfg.dormant_terms == "step":
                zero_fill_missing_grads(params)
            average_gradients(params, self.dist)
            logged["lr"] = self.optimizer.param_groups[0]["lr"]  # the LR this step uses
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        return logged

    def crop_rng_states(self) -> list[Tensor]:
        """Every rank's crop-RNG state, rank order (a collective: all ranks call it)."""
        state = self.crop_rng.get_state()
        if not self.dist.enabled:
            return [state]
        # NCCL gathers device tensors only; the state is a few kB of bytes.
        gathered = all_gather_cat(state[None].to(self.device), self.dist).cpu()
        return [row.clone() for row in gathered]  # own storage: set_state reads from its start

    def state_dict(self, crop_rng_states: Optional[list[Tensor]] = None) -> dict:
        """Training state besides the model: optimizer, schedule, scaler, crop RNG.

        Under torchrun each rank draws its crops from its own generator; pass
        `crop_rng_states()` (gathered on every rank) so that a resumed run continues every
        rank's stream, not rank 0's on all of them."""
        return {
            "loss_modules": self.loss_modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "crop_rng": self.crop_rng.get_state(),
            "crop_rng_ranks": crop_rng_states or [self.crop_rng.get_state()],
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.loss_modules.load_state_dict(state["loss_modules"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("crop_rng_ranks", [])  # absent in checkpoints of older versions
        same_world = len(ranks) == self.dist.world_size
        own = ranks[self.dist.rank] if same_world else state["crop_rng"]
        self.crop_rng.set_state(own.clone())  # a view into a shared storage would crash it
        self.skipped_steps = int(state.get("skipped_steps", 0))


@torch.no_grad()
def validate(
    model: ToCoNet,
    loader: Iterable[dict],
    num_classes: int,
    device: torch.device,
    size: int,
    cam_scales: Sequence[float],
    bkg_thre: float,
    dist_info: DistInfo = DistInfo(),
    autocast=contextlib.nullcontext,
    num_panels: int = 0,
) -> tuple[dict[str, ConfusionMatrix], list[dict]]:
    """ToCo's in-training protocol: resize to size x size, multi-scale CAMs (masked by the GT
    image labels) and single-scale segmentation, scored at the label's resolution.

    Each rank scores its shard of the loader; the confusion matrices are summed across ranks
    (never per-rank mIoU). Returns the matrices and up to `num_panels` picture panels.
    """
    from toco.visualize import heatmap, to_uint8_image

    model.eval()
    results = {k: ConfusionMatrix(num_classes, device=device) for k in ("cam", "aux_cam", "seg")}
    panels: list[dict] = []
    for batch in loader:
        image = batch["image"].to(device).float().div_(255)
        mask = batch["mask"].to(device)
        cls_label = batch["cls_label"].to(device).float()
        with autocast():
            cam, cam_aux = predict_cams(model, image, cam_scales, flip=True, size=size)
            seg = predict_seg_logits(model, image, size=size).float().argmax(1)
        cam_pred = cams_to_prediction(cam.float(), cls_label, bkg_thre)
        results["cam"].update(cam_pred, mask)
        results["aux_cam"].update(cams_to_prediction(cam_aux.float(), cls_label, bkg_thre), mask)
        results["seg"].update(seg, mask)
        if len(panels) < num_panels:
            score = class_score_map(cam.float(), cls_label)[0]
            panels.append(
                {
                    "caption": str(batch["name"][0]),
                    "image": to_uint8_image(image[0]),
                    "heatmap": heatmap(score),
                    "masks": {
                        "prediction": seg[0].cpu().numpy(),
                        "cam": cam_pred[0].cpu().numpy(),
                        "ground_truth": mask[0].cpu().numpy(),
                    },
                }
            )
    if dist_info.enabled:
        for r in results.values():
            r.all_reduce_()
    model.train()
    return results, panels
