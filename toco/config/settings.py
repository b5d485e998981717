"""The training settings: `TrainConfig`, its checks, and what a resumed or stored run keeps.

Every setting is declared with `toco.schema.setting` (YAML key = field name, flag = the name
with dashes); the plug-ins' settings sit in one `plugins` field (toco.config.plugin_section).
Recipes and flags are read by toco.config.recipes and toco.config.flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from toco import schema
from toco.config.plugin_section import (
    PluginSet,
    flatten_plugin_values,
    nest_plugin_values,
    plugin_values_before,
    split_plugin_values,
)
from toco.errors import ConfigError
from toco.plugins.registry import import_plugin_modules
from toco.schema import setting


def _as_reference(quirk: Any, otherwise: Any) -> Callable[[dict[str, Any]], Any]:
    """`before` of a setting whose older runs did what the reference code does when they were
    started with `reference_quirks`, and `otherwise` when not."""
    return lambda stored: quirk if stored.get("reference_quirks", False) else otherwise


@dataclass
class TrainConfig:
    """Every knob of a run. Field names are the YAML keys; flags are the same with dashes."""

    # Data
    dataset: str = setting(
        "synthetic",
        "dataset kind (tags: your own tagged images, docs/own_data.md)",
        ["synthetic", "voc", "coco", "tags"],
        "data",
    )
    data_root: Optional[str] = setting(
        None, "dataset root (VOC layout); synthetic: generated if unset", group="data"
    )
    train_split: Optional[str] = setting(
        None,
        "split list used for training (default: the dataset's, e.g. train_aug for VOC)",
        group="data",
    )
    val_split: Optional[str] = setting(
        None,
        "split list used for validation (default: the dataset's, e.g. val for VOC)",
        group="data",
    )
    cache_dir: str = setting(".cache", "where generated data and label caches live", group="data")
    crop_size: int = setting(448, "training crop size (pixels)", group="data")
    scale_range: tuple = setting(
        (0.5, 2.0), "random rescale range of the training images", group="data", elem=float
    )
    num_workers: int = setting(2, "data-loader worker processes", group="data")
    pair_sampler: str = setting(
        "auto",
        "training batches: auto = as the plug-ins ask (image pairs "
        "for MCIS, else plain shuffling); share_one / random = the MCIS "
        "pair sampler for every run, plug-ins on or off (holds the data "
        "path fixed in an ablation)",
        ["auto", "share_one", "random"],
        group="data",
    )
    synthetic_train: int = setting(800, "synthetic set: number of training images", group="data")
    synthetic_val: int = setting(150, "synthetic set: number of validation images", group="data")
    val_fraction: float = setting(
        0.1,
        "tags without any mask and without splits/val.txt: share "
        "of the images held back for validation (fixed choice)",
        group="data",
    )
    skip_bad_images: bool = setting(
        False,
        "a training image that cannot be decoded is reported "
        "once and replaced by another instead of stopping the run",
        group="data",
    )

    # Model
    backbone: str = setting(
        "vit_base_patch16_224.orig_in21k_ft_in1k",
        "timm ViT name (ViT/DeiT, DINOv2, CLIP, SigLIP, EVA-02; see README 'Backbones')",
        group="model",
    )
    pretrained: str = setting(
        "timm", "'none', 'timm' (hub) or a local checkpoint path", group="model"
    )
    backbone_depth: Optional[int] = setting(
        None, "override the backbone's number of blocks (random init only)", group="model"
    )
    aux_layer: int = setting(
        -3, "block whose pre-norm tokens feed the aux classifier", group="model"
    )
    decoder_dim: int = setting(512, "LargeFOV decoder width", group="model")
    input_norm: str = setting(
        "backbone",
        "input mean/std: the backbone's pretraining values, or "
        "ImageNet's (ToCo's published ViT-B/DeiT-B recipes)",
        ["backbone", "imagenet"],
        "model",
        before="imagenet",
    )
    pos_embed_antialias: bool = setting(
        False,
        "resize the position table with antialiased bicubic "
        "as timm's forward does (ToCo: plain bicubic)",
        group="model",
    )
    freeze_backbone: bool = setting(
        False, "train no backbone parameter (the encoder then runs without autograd)", group="model"
    )
    trainable_blocks: Optional[int] = setting(
        None,
        "train only the last K backbone blocks (and the final norm/pool); default: all",
        group="model",
    )

    # Optimisation
    batch_size: int = setting(4, "global batch size", group="optim")
    max_iters: int = setting(20000, "training iterations", group="optim")
    lr: float = setting(6e-5, "backbone learning rate (heads and decoder get 10x)", group="optim")
    head_lr_mult: float = setting(
        10.0, "LR multiplier of classifier, CTC head and decoder", group="optim"
    )
    weight_decay: float = setting(0.01, "AdamW weight decay (all groups)", group="optim")
    betas: tuple = setting((0.9, 0.999), "AdamW betas", group="optim", elem=float)
    warmup_iters: int = setting(1500, "linear LR warm-up iterations", group="optim")
    warmup_ratio: float = setting(1e-6, "LR factor at iteration 0", group="optim")
    poly_power: float = setting(0.9, "power of the poly decay", group="optim")
    layer_decay: float = setting(
        1.0,
        "layer-wise LR decay of the backbone (BEiT-style): block i "
        "(0-based) of L gets lr x decay^(L-i), the embeddings "
        "decay^(L+1), the final norm lr; 1 = off",
        group="optim",
    )

    # Losses and their schedule
    w_cls: float = setting(1.0, "weight of the classification losses (final and aux)", group="loss")
    w_ptc: float = setting(0.2, "weight of patch-token contrast", group="loss")
    w_ctc: float = setting(0.5, "weight of class-token contrast", group="loss")
    w_seg: float = setting(0.1, "weight of the segmentation loss", group="loss")
    w_reg: float = setting(0.05, "weight of the dense energy (CRF) regulariser", group="loss")
    seg_start_iter: int = setting(
        2001, "iteration where the seg and reg losses switch on", group="loss"
    )
    contrast_start_iter: int = setting(0, "iteration where PTC and CTC switch on", group="loss")
    aux_cam_until_iter: int = setting(
        0,
        "seg pseudo labels come from the aux CAM before this iteration (COCO recipe: 12000)",
        group="loss",
    )
    ctc_temp: float = setting(0.5, "CTC temperature", group="loss")
    ema_momentum: float = setting(0.9, "EMA momentum of the CTC teacher head", group="loss")
    num_local_crops: int = setting(8, "local crops per image for CTC", group="loss")
    local_crop_size: int = setting(96, "local crop size for CTC (pixels)", group="loss")
    ctc_hidden_dim: int = setting(2048, "width of the CTC projection head's MLP", group="loss")
    ctc_out_dim: int = setting(1024, "output width of the CTC projection head", group="loss")
    ctc_neg_ratio: float = setting(
        0.2, "a local crop whose ROI mean is <= this is a negative", group="loss"
    )

    # Pseudo labels
    cam_scales: tuple = setting(
        (1.0, 0.5, 1.5), "scales of the online multi-scale CAM", group="pseudo", elem=float
    )
    high_thre: float = setting(0.7, "CAM score above which a pixel is foreground", group="pseudo")
    low_thre: float = setting(0.25, "CAM score below which a pixel is background", group="pseudo")
    bkg_thre: float = setting(0.5, "background score for CAM evaluation", group="pseudo")
    par_iters: int = setting(10, "PAR propagation steps", group="pseudo")
    par_dilations: tuple = setting((1, 2, 4, 8, 12, 24), "PAR neighbour dilations", group="pseudo")
    refine_down_scale: int = setting(2, "PAR runs at 1/this of the crop size", group="pseudo")

    # Fidelity: where this code may differ from the official ToCo run (docs/fidelity.md).
    # Defaults are the official behaviour, except for pure bug fixes (misaligned boxes/crops).
    reference_quirks: bool = setting(
        False,
        "restore every official behaviour listed in "
        "docs/fidelity.md at once (explicit per-item flags still win)",
        group="fidelity",
    )
    dormant_terms: str = setting(
        "step",
        "a loss term before its start iteration: 'step' = as "
        "the official run (its parameters take zero-gradient AdamW steps, "
        "the CTC teacher EMA runs every iteration) without computing it; "
        "'skip' = its parameters wait untouched",
        ["step", "skip"],
        "fidelity",
        before="skip",
    )
    reg_gradient: str = setting(
        "reference",
        "gradient of the energy loss: rloss's "
        "-(2/B)·Gate·(K S)·ROI ('reference') or the exact derivative",
        ["reference", "exact"],
        "fidelity",
        before=_as_reference("reference", "exact"),
    )
    ctc_negative_term: bool = setting(
        True,
        "CTC adds log(1 + sum of negatives) per teacher view, as the official for-else does (B3)",
        group="fidelity",
        before=_as_reference(True, False),
    )
    par_input: str = setting(
        "uint8",
        "PAR sees the image truncated to uint8 as the official "
        "code does (B17), or the exact float image",
        ["uint8", "float"],
        "fidelity",
        before="float",
    )
    ptc_box: str = setting(
        "grid",
        "PTC labels are cut with the image box scaled to the token grid "
        "(fix) or with the pixel box applied unscaled as the official code does "
        "(B1)",
        ["grid", "pixels"],
        "fidelity",
        before=_as_reference("pixels", "grid"),
    )
    local_view_flip: str = setting(
        "aligned",
        "the CTC local view is flipped with the main view "
        "(fix) or independently as the official code does (B2)",
        ["aligned", "independent"],
        "fidelity",
        before=_as_reference("independent", "aligned"),
    )
    image_labels: str = setting(
        "masks",
        "image-level labels from the segmentation masks or from "
        "the per-image annotation files (VOC Annotations/*.xml, as the "
        "official label file); ids without an annotation file use their "
        "mask",
        ["masks", "annotations"],
        "data",
        before="masks",
    )

    # Recorded, not set: the recipe file(s) whose values this run started from.
    recipe: Optional[str] = setting(
        None, "recipe file(s) applied (filled in by the parser)", group="run", internal=True
    )

    # User modules that register plug-ins (docs/extending.md); imported before `plugins` is read,
    # stored so that every tool that rebuilds this model imports them again.
    plugin_modules: tuple = setting(
        (),
        "module imported before the flags are read, so that the "
        "plug-in or loss term it registers can be used (repeatable; "
        "recipe key plugin_modules)",
        group="plugins",
        elem=str,
        internal=True,
    )

    # Seed plug-ins: every registered plug-in's settings (toco/config/plugin_section.py)
    plugins: PluginSet = field(
        default_factory=PluginSet,
        metadata={
            "help": "plug-in settings, one section per plug-in (flags: the plug-in groups)",
            "group": "plugins",
            "internal": True,
        },
    )

    # Run
    work_dir: Optional[str] = setting(
        None, "run folder (default: work_dirs/<dataset>)", group="run"
    )
    device: str = setting("auto", "compute device", ["auto", "cpu", "cuda"], "run")
    seed: int = setting(0, "random seed", group="run")
    eval_every: int = setting(
        2000, "validate every N iterations (and at the end); 0 = never", group="run"
    )
    val_size: Optional[int] = setting(
        None,
        "in-training validation resizes images to this square size (default: crop size)",
        group="run",
    )
    val_scales: tuple = setting(
        (1.0, 0.5, 1.5), "CAM scales for validation", group="run", elem=float
    )
    log_every: int = setting(50, "log the running losses every N iterations", group="run")
    save_every: int = setting(1000, "write checkpoints/last.pt every N iterations", group="run")
    threads: Optional[int] = setting(
        None, "CPU threads for torch (default: torch's choice)", group="run"
    )
    amp: str = setting(
        "none",
        "mixed precision: none = fp32 (the official runs; TF32 per --tf32), "
        "auto = bf16 on GPUs that support it",
        ["auto", "none", "bf16", "fp16"],
        "run",
    )
    compile: str = setting(
        "none",
        "torch.compile the backbone's blocks (GPU runs; the first "
        "steps of each input size are slow while it compiles)",
        ["none", "default", "reduce-overhead", "max-autotune"],
        "run",
    )
    grad_checkpointing: bool = setting(
        False,
        "recompute the backbone blocks in backward instead "
        "of storing their activations (less memory, ~30% more "
        "compute; same numbers)",
        group="run",
    )
    tf32: bool = setting(True, "allow TF32 matmuls/convolutions on Ampere+ GPUs", group="run")
    loss_group_size: int = setting(
        0,
        "compute PTC and seg losses per group of this many images "
        "and average (ToCo: 2 images per GPU); 0 = the whole per-device "
        "batch",
        group="run",
    )
    nonfinite: str = setting(
        "stop",
        "on a NaN/inf loss: stop (last checkpoint kept) or skip the step",
        ["stop", "skip"],
        "run",
    )
    stop_at: Optional[int] = setting(
        None,
        "end the run after this iteration (checkpoint saved, schedule unchanged); resume later",
        group="run",
    )
    wandb: str = setting(
        "disabled", "Weights & Biases logging mode", ["disabled", "offline", "online"], "run"
    )
    wandb_project: str = setting("wsss-toco", "wandb project", group="run")
    wandb_name: Optional[str] = setting(
        None, "wandb run name (default: the work dir's name)", group="run"
    )
    wandb_tags: tuple = setting((), "wandb tags", group="run")
    num_vis: int = setting(4, "images per wandb panel at each validation", group="run")
    preview_images: int = setting(
        6,
        "validation images drawn in the run folder's preview.png at "
        "each validation (input, ground truth, CAM, pseudo label, "
        "prediction); 0 = none",
        group="run",
    )

    def validate(self) -> "TrainConfig":
        """Check ranges and consistency; raise ConfigError naming the offending field."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        schema.check_choices(self, lambda name: name)
        for name in (
            "crop_size",
            "batch_size",
            "max_iters",
            "log_every",
            "save_every",
            "par_iters",
            "num_local_crops",
            "local_crop_size",
            "ctc_hidden_dim",
            "ctc_out_dim",
            "refine_down_scale",
            "synthetic_train",
            "synthetic_val",
        ):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "warmup_iters",
            "seg_start_iter",
            "contrast_start_iter",
            "aux_cam_until_iter",
            "num_workers",
            "loss_group_size",
            "num_vis",
            "eval_every",
        ):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "w_cls", "w_ptc", "w_ctc", "w_seg", "w_reg", "weight_decay", "ctc_temp"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.ctc_temp > 0, "ctc_temp must be > 0")
        need(
            0 <= self.low_thre <= self.high_thre <= 1,
            f"need 0 <= low_thre <= high_thre <= 1, got {self.low_thre}, {self.high_thre}",
        )
        need(0 <= self.bkg_thre <= 1, f"bkg_thre must be in [0, 1], got {self.bkg_thre}")
        need(0 <= self.ema_momentum <= 1, "ema_momentum must be in [0, 1]")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(
            len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1],
            f"scale_range must be two increasing positive numbers, got {self.scale_range}",
        )
        need(len(self.betas) == 2, "betas must be two numbers")
        need(
            len(self.cam_scales) > 0 and all(s > 0 for s in self.cam_scales),
            "cam_scales must be positive",
        )
        need(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}")
        need(
            self.trainable_blocks is None or self.trainable_blocks >= 0,
            f"trainable_blocks must be >= 0, got {self.trainable_blocks}",
        )
        need(
            not (self.freeze_backbone and self.trainable_blocks),
            "--freeze-backbone contradicts --trainable-blocks "
            f"{self.trainable_blocks}: use one of them",
        )
        need(
            self.stop_at is None or 0 < self.stop_at <= self.max_iters,
            f"stop_at must be in 1..max_iters, got {self.stop_at}",
        )
        need(
            self.dataset == "synthetic" or self.data_root is not None,
            f"--data-root is required for --dataset {self.dataset}",
        )
        self._validate_core_ranges(need)
        self._validate_batch(need)
        self.check_geometry(patch_size=1)
        self.plugins.validate(self)
        return self

    def _validate_core_ranges(self, need: Callable[[bool, str], None]) -> None:
        for name in ("backbone_depth", "threads", "val_size"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be positive, got {value}")
        need(self.decoder_dim > 0, f"decoder_dim must be positive, got {self.decoder_dim}")
        for name in ("head_lr_mult", "warmup_ratio", "poly_power"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(
            all(0 <= b < 1 for b in self.betas),
            f"betas must be in [0, 1), got {self.betas} (AdamW default: 0.9 0.999)",
        )
        if self.backbone_depth is not None:
            depth = self.backbone_depth
            need(
                -depth <= self.aux_layer < depth,
                f"--aux-layer {self.aux_layer} is not a block of a --backbone-depth {depth} "
                f"backbone: use --aux-layer in {-depth}..{depth - 1} (e.g. {max(-3, -depth)})",
            )

    def _validate_batch(self, need: Callable[[bool, str], None]) -> None:
        """Batch vs loss groups and the generated set (per-device checks: the runner)."""
        group = self.loss_group_size
        need(
            group == 0 or self.batch_size % group == 0,
            f"--loss-group-size {group} does not divide --batch-size {self.batch_size}: use a "
            f"divisor of the per-device batch (e.g. --loss-group-size "
            f"{math.gcd(group, self.batch_size)}) or 0 (one group)",
        )
        need(
            self.dataset != "synthetic" or self.synthetic_train >= self.batch_size,
            f"--synthetic-train {self.synthetic_train} images are fewer than one batch "
            f"(--batch-size {self.batch_size}): use --synthetic-train >= {self.batch_size}",
        )

    def check_geometry(self, patch_size: int) -> None:
        """Crop sizes and scales against each other and the backbone's patch (ConfigError).

        `validate` runs it with patch 1 (what holds for any backbone); the runner again with
        the built backbone's patch, before any data or run folder is touched.
        """
        p, crop, local = patch_size, self.crop_size, self.local_crop_size
        if crop < p:
            raise ConfigError(
                f"--crop-size {crop} is smaller than one {p}-px patch of the "
                f"backbone: use --crop-size >= {max(2 * p, 2)} (e.g. {32 * p})"
            )
        # Local crops are centred on pixels at least local // 2 from each border.
        margin = local // 2
        largest = crop if crop % 2 else crop - 1
        patch = f"one {p}-px patch and " if p > 1 else ""
        if local < p or crop - 2 * margin < 1:
            fits = min(largest, max(p, crop // 2))
            hint = (
                f"use --local-crop-size {fits} (at most {largest})"
                if fits >= p
                else f"use a --crop-size of at least {2 * p}"
            )
            raise ConfigError(
                f"--local-crop-size {local} does not fit --crop-size {crop} "
                f"(a local crop needs {patch}a centre at least {margin} px from "
                f"each border): {hint}"
            )
        positions = (crop - 2 * margin) ** 2
        if self.num_local_crops > positions:
            raise ConfigError(
                f"--num-local-crops {self.num_local_crops} exceeds the {positions} "
                f"distinct positions of a {local}-px crop in a {crop}-px one: use "
                f"--num-local-crops <= {positions} or a smaller --local-crop-size"
            )
        for flag, scales, size, need_px in (
            ("--cam-scales", self.cam_scales, crop, p),
            ("--val-scales", self.val_scales, self.val_size or crop, 1),
        ):
            # Validation pads its inputs to a multiple of the patch: one pixel is enough there.
            small = [s for s in scales if int(s * size) < need_px]
            if small:
                lowest = math.ceil(need_px / size * 100) / 100
                token = f" (one {p}-px token)" if need_px > 1 else ""
                raise ConfigError(
                    f"{flag} {small[0]:g} shrinks the {size}-px image to "
                    f"{int(small[0] * size)} px, less than {need_px} px{token}: "
                    f"use scales >= {lowest:g}"
                )
        side = crop // self.refine_down_scale
        if side < 1:
            raise ConfigError(
                f"--refine-down-scale {self.refine_down_scale} shrinks the {crop}-px "
                f"crop to nothing for PAR: use --refine-down-scale <= {crop} "
                "(ToCo: 2)"
            )
        if not self.par_dilations or min(self.par_dilations) < 1:
            raise ConfigError(f"--par-dilations must be integers >= 1, got {self.par_dilations}")
        # A dilation beyond PAR's image only sees border pixels (a warning); beyond the whole
        # crop it cannot be meant, and its padding costs memory quadratically.
        if max(self.par_dilations) > crop:
            fit = [d for d in self.par_dilations if d < side] or [1]
            raise ConfigError(
                f"--par-dilations {max(self.par_dilations)} exceeds --crop-size "
                f"{crop} (PAR runs on a {side}-px image, --crop-size / "
                f"--refine-down-scale): use dilations < {side}, e.g. "
                f"--par-dilations {' '.join(map(str, fit))}"
            )

    def schedule_warnings(self, patch_size: Optional[int] = None) -> list[str]:
        """Settings that are valid but probably not meant: a loss that never switches on,
        a warm-up longer than the run, PAR dilations past its image, a crop the patch grid
        does not cover."""
        out = []
        last = self.max_iters - 1
        for flags, weights, start in (
            ("--w-seg/--w-reg", (self.w_seg, self.w_reg), self.seg_start_iter),
            ("--w-ptc/--w-ctc", (self.w_ptc, self.w_ctc), self.contrast_start_iter),
        ):
            if any(w > 0 for w in weights) and start > last:
                out.append(
                    f"{flags}: the loss switches on at iteration {start}, after the last "
                    f"one ({last}, --max-iters {self.max_iters}): it never trains"
                )
        if self.warmup_iters > self.max_iters:
            out.append(
                f"--warmup-iters {self.warmup_iters} exceeds --max-iters "
                f"{self.max_iters}: the LR never reaches its peak"
            )
        side = self.crop_size // self.refine_down_scale
        far = [d for d in self.par_dilations if d >= side]
        if far:
            out.append(
                f"--par-dilations {' '.join(map(str, far))} reach past PAR's {side}-px "
                f"image (--crop-size {self.crop_size} / --refine-down-scale "
                f"{self.refine_down_scale}): those neighbours are border pixels only"
            )
        if patch_size and self.crop_size % patch_size:
            lower = self.crop_size // patch_size * patch_size
            out.append(
                f"--crop-size {self.crop_size} is not a multiple of the {patch_size}-px "
                f"patch: the encoder drops the last {self.crop_size - lower} px rows and "
                f"columns; {lower or patch_size} or {lower + patch_size} uses every pixel"
            )
        return out

    def __post_init__(self) -> None:
        if self.work_dir is None:
            self.work_dir = f"work_dirs/{self.dataset}"
        self.plugin_modules = import_plugin_modules(self.plugin_modules, "config")
        self.plugins = PluginSet(self.plugins)  # a copy: configs never share plug-in settings

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["plugins"] = self.plugins.to_dict()
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        return cls(**nest_plugin_values(coerce_settings(values, source))).validate()

    @classmethod
    def from_saved(cls, values: dict[str, Any], source: str = "checkpoint config") -> "TrainConfig":
        """The config stored in a checkpoint or export. A setting added after it was written
        takes the value that reproduces how that run actually behaved, not today's default."""
        core, _ = split_plugin_values(values, source)
        given = {str(k).replace("-", "_") for k in core}
        return cls.from_dict(
            {**schema.values_before(cls, values, given), **plugin_values_before(values), **values},
            source,
        )


# Settings a run may change when it is resumed: length, bookkeeping, runtime and locations.
# Everything else changes what the run computes, so an unfinished run is only continued with
# the values it was started with.
RESUMABLE_SETTINGS = frozenset(
    {
        "max_iters",
        "stop_at",
        "eval_every",
        "log_every",
        "save_every",
        "num_vis",
        "wandb",
        "wandb_project",
        "wandb_name",
        "wandb_tags",
        "num_workers",
        "threads",
        "device",
        "compile",
        "grad_checkpointing",
        "nonfinite",
        "skip_bad_images",
        "data_root",
        "cache_dir",
        "work_dir",
        "recipe",
        "preview_images",
    }
)


def flat_settings(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting of `cfg` as one flat mapping (plug-in settings as `plugins.<name>.<key>`)."""
    values = cfg.to_dict()
    return {
        **{k: v for k, v in values.items() if k != "plugins"},
        **flatten_plugin_values(values["plugins"]),
    }


def changed_settings(saved: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The settings outside RESUMABLE_SETTINGS whose values differ: key -> (saved, new)."""
    old, now = flat_settings(saved), flat_settings(new)
    return {
        k: (old.get(k), now.get(k))
        for k in sorted(set(old) | set(now))
        if k not in RESUMABLE_SETTINGS and old.get(k) != now.get(k)
    }


def resumed_config(saved: TrainConfig, new: TrainConfig) -> TrainConfig:
    """The stored run's settings, with the resumable ones taken from `new`."""
    values = flat_settings(saved)
    values.update({k: v for k, v in flat_settings(new).items() if k in RESUMABLE_SETTINGS})
    return TrainConfig.from_dict(values, "resumed run")


FIELDS = schema.fields_of(TrainConfig)

# The official run's behaviour for every switchable difference (docs/fidelity.md);
# `reference_quirks: true` applies all of it over the recipe, below explicit flags.
OFFICIAL_BEHAVIOUR: dict[str, Any] = {
    "dormant_terms": "step",
    "reg_gradient": "reference",
    "ctc_negative_term": True,
    "par_input": "uint8",
    "ptc_box": "pixels",
    "local_view_flip": "independent",
    "image_labels": "annotations",
    "amp": "none",
    "tf32": True,
    "input_norm": "imagenet",
}


def coerce_settings(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Normalise keys (dashes → underscores), reject unknown ones, convert value types.

    Plug-in settings (the `plugins:` section, the plug-in flags, or older flat keys) come back
    typed as dotted keys `plugins.<name>.<setting>`, so layers merge setting by setting."""
    values, plugin_values = split_plugin_values(values, source)
    out = flatten_plugin_values(plugin_values)
    for raw_key, value in values.items():
        key = schema.current_name(TrainConfig, str(raw_key).replace("-", "_"))
        if key not in FIELDS:
            raise schema.unknown_key("setting", str(raw_key), FIELDS, source)
        out[key] = schema.convert(TrainConfig, key, value, source, str(raw_key))
    return out
