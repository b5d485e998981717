"""Fidelity to the official ToCo run: recipes, dormant-term dynamics, the energy gradient, the
logged LR, the reference-quirks switch, the PAR input and the image-label source."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

from tests.fixtures import ImageSpec, make_voc_tree, write_voc_xml
from toco.build import build_loss_modules, build_model
from toco.config import CONFIG_DIR, OFFICIAL_BEHAVIOUR, TrainConfig, parse_config
from toco.method.cam import multi_scale_cam
from toco.method.energy import RegularizationLoss, dense_energy_loss
from toco.method.step import LossModule, StepState
from toco.train.engine import Trainer, truncate_like_reference
from toco.train.schedule import poly_warmup_factor

# ---- the published recipes against the official values (ToCo spec, section 10) ----
# Written from the specification, not from the YAML files.
TOCO_COMMON = {
    "crop_size": 448,
    "scale_range": (0.5, 2.0),
    "lr": 6e-5,
    "head_lr_mult": 10.0,
    "weight_decay": 0.01,
    "betas": (0.9, 0.999),
    "warmup_iters": 1500,
    "warmup_ratio": 1e-6,
    "poly_power": 0.9,
    "w_cls": 1.0,
    "w_ptc": 0.2,
    "w_ctc": 0.5,
    "w_seg": 0.1,
    "w_reg": 0.05,
    "ema_momentum": 0.9,
    "ctc_hidden_dim": 2048,
    "ctc_out_dim": 1024,
    "num_local_crops": 8,
    "local_crop_size": 96,
    "ctc_neg_ratio": 0.2,
    "cam_scales": (1.0, 0.5, 1.5),
    "low_thre": 0.25,
    "par_iters": 10,
    "par_dilations": (1, 2, 4, 8, 12, 24),
    "refine_down_scale": 2,
    "aux_layer": -3,
    "decoder_dim": 512,
    "loss_group_size": 2,
    "amp": "none",
    "tf32": True,
    "val_size": 448,
    "val_scales": (1.0, 0.5, 1.5),
    "seed": 0,
    "log_every": 200,
    "pretrained": "timm",
    "input_norm": "imagenet",
    "pos_embed_antialias": False,
    "freeze_backbone": False,
    "trainable_blocks": None,
    "layer_decay": 1.0,
    # official behaviours, except the two fixes of misaligned boxes / crops
    "dormant_terms": "step",
    "reg_gradient": "reference",
    "ctc_negative_term": True,
    "par_input": "uint8",
    "image_labels": "annotations",
    "ptc_box": "grid",
    "local_view_flip": "aligned",
    "reference_quirks": False,
}
VOC = {
    **TOCO_COMMON,
    "dataset": "voc",
    "train_split": "train_aug",
    "val_split": "val",
    "batch_size": 4,
    "max_iters": 20000,
    "high_thre": 0.7,
    "bkg_thre": 0.5,
    "seg_start_iter": 2001,
    "contrast_start_iter": 0,
    "aux_cam_until_iter": 0,
    "ctc_temp": 0.5,
    "eval_every": 2000,
}
COCO = {
    **TOCO_COMMON,
    "dataset": "coco",
    "train_split": "train",
    "val_split": "val_part",
    "batch_size": 8,
    "max_iters": 80000,
    "high_thre": 0.65,
    "bkg_thre": 0.45,
    "seg_start_iter": 8001,
    "contrast_start_iter": 12001,
    "aux_cam_until_iter": 12001,
    "ctc_temp": 1.0,
    "eval_every": 4000,
}
VIT_B = "vit_base_patch16_224.orig_in21k_ft_in1k"
DEIT_B = "deit_base_patch16_224.fb_in1k"
RECIPES = {
    "voc_vit_b": {**VOC, "backbone": VIT_B},
    "voc_deit_b": {**VOC, "backbone": DEIT_B},
    "coco_vit_b": {**COCO, "backbone": VIT_B},
    "coco_deit_b": {**COCO, "backbone": DEIT_B},
}
# Keys a recipe may set beyond the specification's (bookkeeping, not numerics).
BOOKKEEPING = {"work_dir", "save_every"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_matches_the_official_values_key_by_key(name):
    path = CONFIG_DIR / f"{name}.yaml"
    cfg, _ = parse_config(["--config", str(path), "--data-root", "/data"])
    for key, value in RECIPES[name].items():
        assert getattr(cfg, key) == pytest.approx(value), key
    written = set(yaml.safe_load(path.read_text()))
    assert written - set(RECIPES[name]) <= BOOKKEEPING, "recipe sets keys the spec does not fix"


@pytest.mark.parametrize("dataset, recipe", [("voc", "voc_vit_b"), ("coco", "coco_vit_b")])
def test_dataset_without_config_uses_its_published_recipe(dataset, recipe):
    cfg, _ = parse_config(["--dataset", dataset, "--data-root", "/data"])
    for key, value in RECIPES[recipe].items():
        assert getattr(cfg, key) == pytest.approx(value), key
    assert cfg.recipe == f"configs/{recipe}.yaml"


def test_coco_resolves_the_coco_thresholds_and_schedule():
    cfg, _ = parse_config(["--dataset", "coco", "--data-root", "/data"])
    assert (cfg.high_thre, cfg.low_thre, cfg.bkg_thre) == (0.65, 0.25, 0.45)
    assert (cfg.seg_start_iter, cfg.contrast_start_iter, cfg.aux_cam_until_iter) == (
        8001,
        12001,
        12001,
    )
    assert (cfg.batch_size, cfg.max_iters, cfg.ctc_temp) == (8, 80000, 1.0)


def test_recipe_record_names_every_applied_file(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("max_iters: 10\n")
    cfg, _ = parse_config(["--dataset", "voc", "--data-root", "/d", "--config", str(extra)])
    assert cfg.recipe == f"configs/voc_vit_b.yaml + {extra}" and cfg.max_iters == 10


def test_reference_quirks_restores_every_official_behaviour_and_flags_win():
    cfg, _ = parse_config(["--reference-quirks"])  # over the synthetic recipe's own choices
    for key, value in OFFICIAL_BEHAVIOUR.items():
        assert getattr(cfg, key) == value, key
    assert cfg.ptc_box == "pixels" and cfg.local_view_flip == "independent"
    cfg, _ = parse_config(["--reference-quirks", "--ptc-box", "grid", "--no-ctc-negative-term"])
    assert cfg.ptc_box == "grid" and cfg.ctc_negative_term is False
    assert cfg.local_view_flip == "independent"


def test_precision_defaults_to_fp32():
    from toco.runtime import resolve_amp

    assert TrainConfig().amp == "none"
    assert resolve_amp("none", torch.device("cpu")) is None


# ---- training dynamics on a tiny model ----
def tiny_cfg(**over) -> TrainConfig:
    base = dict(
        dataset="synthetic",
        backbone="deit_tiny_patch16_224",
        backbone_depth=2,
        aux_layer=0,
        pretrained="none",
        crop_size=32,
        local_crop_size=16,
        num_local_crops=2,
        batch_size=2,
        decoder_dim=8,
        cam_scales=(1.0,),
        par_iters=2,
        par_dilations=(1, 2),
        max_iters=50,
        warmup_iters=2,
        lr=1e-3,
        w_reg=0.05,
        seed=0,
    )
    return TrainConfig(**{**base, **over}).validate()


def tiny_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def img() -> torch.Tensor:
        return torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)

    return {
        "image": img(),
        "view2": img(),
        "local_view": img(),
        "cls_label": torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 1.0, 0, 0, 0, 0]]),
        "img_box": torch.tensor([[0, 32, 0, 28], [2, 32, 0, 32]]),
    }


class ComputedAtZeroWeight(LossModule):
    """The official way: the term is computed every iteration and multiplied by 0 before its
    start iteration (the straightforward loop the dormant-term shortcut must equal)."""

    def __init__(self, inner: LossModule) -> None:
        super().__init__(inner.weight, 0)
        self.inner = inner
        self.names = inner.names
        self.needs_decoder = inner.needs_decoder
        self.iteration = 0

    @property
    def weight(self) -> float:  # read by the engine after compute()
        return self.inner.weight if self.iteration >= self.inner.start_iter else 0.0

    @weight.setter
    def weight(self, value: float) -> None:
        pass

    def active(self, iteration: int) -> bool:
        return True

    def compute(self, state: StepState) -> dict[str, torch.Tensor]:
        self.iteration = state.iteration
        return self.inner.compute(state)


def trainers(cfg: TrainConfig, zero_weight: bool = True) -> tuple[Trainer, Trainer]:
    """The engine's trainer and a second one from the same weights: the straightforward loop
    that computes dormant terms at weight 0 (zero_weight), or a plain copy."""
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=7)
    fast = Trainer(cfg, model, build_loss_modules(cfg), torch.device("cpu"))
    ref_modules = [ComputedAtZeroWeight(m) if zero_weight else m for m in build_loss_modules(cfg)]
    ref = Trainer(cfg, copy.deepcopy(model), ref_modules, torch.device("cpu"))
    return fast, ref


def record_gradients(trainer: Trainer) -> list[list[torch.Tensor]]:
    """A list that receives, at every optimizer step, a copy of every gradient it applies."""
    steps: list[list[torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: steps.append(
            [p.grad.clone() for g in opt.param_groups for p in g["params"]]
        )
    )
    return steps


def adam_state(trainer: Trainer, params) -> list[dict]:
    return [trainer.optimizer.state[p] for p in params]


def assert_same_params_and_state(a: Trainer, b: Trainer, module_name: str) -> None:
    pa = list(getattr(a.model, module_name).parameters())
    pb = list(getattr(b.model, module_name).parameters())
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    for sa, sb in zip(
        adam_state(a, [p for p in pa if p.requires_grad]),
        adam_state(b, [p for p in pb if p.requires_grad]),
    ):
        assert sa and sb, f"{module_name}: a parameter took no optimizer step"
        assert float(sa["step"]) == float(sb["step"])
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-6, atol=1e-12)


# Tolerance: both sides add the same non-zero gradients; the reference also adds exact zeros
# (0 x loss), which can only change the order of float accumulation (1e-6 relative).
K = 3


def test_dormant_decoder_takes_zero_gradient_steps_like_the_official_loop():
    cfg = tiny_cfg(seg_start_iter=100)
    fast, ref = trainers(cfg)
    decoder0 = [p.detach().clone() for p in fast.model.decoder.parameters()]
    for it in range(K):
        batch = tiny_batch(it)
        fast.train_step(batch, it)
        ref.train_step(batch, it)
    assert_same_params_and_state(fast, ref, "decoder")
    assert_same_params_and_state(fast, ref, "backbone")
    # Zero gradients: the moments stay 0 and only the decoupled weight decay moved the weights.
    shrink = np.prod(
        [
            1
            - cfg.lr
            * cfg.head_lr_mult
            * cfg.weight_decay
            * poly_warmup_factor(
                t, cfg.warmup_iters, cfg.max_iters, cfg.warmup_ratio, cfg.poly_power
            )
            for t in range(K)
        ]
    )
    for p, p0 in zip(fast.model.decoder.parameters(), decoder0):
        torch.testing.assert_close(p, p0 * float(shrink), rtol=1e-6, atol=1e-9)
        assert float(fast.optimizer.state[p]["step"]) == K
        assert torch.count_nonzero(fast.optimizer.state[p]["exp_avg"]) == 0


def test_skip_mode_keeps_dormant_parameters_untouched():
    cfg = tiny_cfg(seg_start_iter=100, dormant_terms="skip")
    fast, _ = trainers(cfg)
    decoder0 = [p.detach().clone() for p in fast.model.decoder.parameters()]
    for it in range(K):
        fast.train_step(tiny_batch(it), it)
    for p, p0 in zip(fast.model.decoder.parameters(), decoder0):
        assert torch.equal(p, p0) and not fast.optimizer.state[p]


def test_dormant_ctc_still_updates_the_teacher_every_iteration():
    cfg = tiny_cfg(contrast_start_iter=100, seg_start_iter=100)
    fast, ref = trainers(cfg)
    m = cfg.ema_momentum
    teacher = [p.detach().clone() for p in fast.model.proj_head_teacher.parameters()]
    for it in range(K):
        student = [p.detach().clone() for p in fast.model.proj_head.parameters()]
        teacher = [m * t + (1 - m) * s for t, s in zip(teacher, student)]
        batch = tiny_batch(it)
        fast.train_step(batch, it)
        ref.train_step(batch, it)
    for got, want in zip(fast.model.proj_head_teacher.parameters(), teacher):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    for a, b in zip(
        fast.model.proj_head_teacher.parameters(), ref.model.proj_head_teacher.parameters()
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert_same_params_and_state(fast, ref, "proj_head")


def test_logged_lr_is_the_lr_the_step_used():
    cfg = tiny_cfg(warmup_iters=3)
    fast, _ = trainers(cfg)
    used = []
    fast.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"])
    )
    logged = [fast.train_step(tiny_batch(t), t)["lr"] for t in range(4)]
    assert logged == used
    for t, lr in enumerate(logged):
        assert lr == pytest.approx(cfg.lr * poly_warmup_factor(t, 3, cfg.max_iters, 1e-6, 0.9))


# ---- the energy loss gradient ----
def energy_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, 12, 12, generator=g) * 255
    logits = torch.randn(2, 3, 12, 12, generator=g, dtype=torch.float64)
    roi = torch.ones(2, 12, 12, dtype=torch.bool)
    roi[1, :, 9:] = False
    label = torch.randint(0, 3, (2, 12, 12), generator=g)
    label[0, :3] = 255
    return image.double(), logits, roi, label


def test_default_energy_gradient_is_the_reference_formula():
    cfg = TrainConfig()
    reg = [m for m in build_loss_modules(cfg) if isinstance(m, RegularizationLoss)][0]
    assert reg.reference_gradient is True
    image, logits, roi, label = energy_inputs()
    probs = torch.softmax(logits, 1).requires_grad_(True)
    dense_energy_loss(
        image,
        probs,
        roi,
        label,
        sigma_xy=6.0,
        scale_factor=1.0,
        reference_gradient=reg.reference_gradient,
        method="exact",
    ).backward()
    # -(2/B) Gate (K S') ROI, written out with a brute-force Gaussian sum.
    b, c, h, w = probs.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    feats = torch.cat(
        [torch.stack([xs / 6.0, ys / 6.0]).double()[None].expand(b, -1, -1, -1), image / 15.0], 1
    ).flatten(2)  # (B, 5, N)
    kernel = torch.exp(-0.5 * ((feats[:, :, :, None] - feats[:, :, None, :]) ** 2).sum(1))
    s = (probs.detach() * roi[:, None]).flatten(2)  # (B, C, N)
    ks = torch.einsum("bnm,bcm->bcn", kernel, s)
    gate = (roi.double() - probs.detach().amax(1)).masked_fill(label == 255, 1).clamp(min=0)
    expected = -2.0 / b * gate.flatten(1)[:, None] * ks * roi.flatten(1)[:, None]
    torch.testing.assert_close(probs.grad.flatten(2), expected, rtol=1e-6, atol=1e-10)


def test_exact_energy_gradient_matches_finite_differences():
    image, logits, roi, label = energy_inputs(1)
    label.fill_(255)  # gate = 1 everywhere: the energy is smooth in the probabilities
    probs = torch.softmax(logits, 1).requires_grad_(True)

    def energy(p):
        return dense_energy_loss(
            image,
            p,
            roi,
            label,
            sigma_xy=6.0,
            scale_factor=1.0,
            reference_gradient=False,
            method="exact",
        )

    assert torch.autograd.gradcheck(energy, (probs,), eps=1e-6, atol=1e-6)


# ---- PAR input (B17) ----
def test_uint8_par_input_follows_the_official_denormalisation():
    values = torch.arange(256, dtype=torch.float32) / 255
    images = values.view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    got = truncate_like_reference(images)
    # Independently in numpy float32: torchvision Normalize, then x * std255 + mean255, cast.
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    mean255 = np.array([123.675, 116.28, 103.53], np.float32)[:, None, None]
    std255 = np.array([58.395, 57.12, 57.375], np.float32)[:, None, None]
    x = (images[0].numpy() - mean) / std
    want = np.clip(x * std255 + mean255, 0, 255).astype(np.uint8).astype(np.float32) / 255
    assert np.array_equal(got[0].numpy(), want)  # the same truncation, value for value
    assert (got <= images + 1e-7).all() and (got < images - 1e-4).any()  # truncation loses


def test_par_input_switch_reaches_the_pseudo_label(monkeypatch):
    seen = {}
    import toco.train.engine as engine

    def spy(par, images, *args, **kwargs):
        seen["images"] = images
        return torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long)

    monkeypatch.setattr(engine, "refine_cams_with_bkg", spy)
    for mode in ("uint8", "float"):
        fast, _ = trainers(tiny_cfg(seg_start_iter=0, w_reg=0.0, par_input=mode))
        fast.train_step(tiny_batch(0), 0)
        images = tiny_batch(0)["image"].float() / 255
        expected = truncate_like_reference(images) if mode == "uint8" else images
        assert torch.equal(seen["images"], expected)


# ---- image-level labels: masks or annotation files ----
def test_image_labels_from_annotation_files(tmp_path):
    from datasets.voc import VOC_CLASSES, VOCTrainDataset

    mask_a = np.zeros((40, 48), np.uint8)
    mask_a[5:20, 5:20] = 1  # the mask shows aeroplane
    mask_b = np.zeros((40, 48), np.uint8)
    mask_b[5:20, 5:20] = 2
    root = make_voc_tree(tmp_path / "VOC", [ImageSpec("a", mask_a), ImageSpec("b", mask_b)])
    write_voc_xml(root / "Annotations" / "a.xml", (40, 48), ["aeroplane", "person"])
    by_mask = VOCTrainDataset(root, "train", crop_size=32)
    with pytest.warns(UserWarning, match="1 of 2 id"):
        by_xml = VOCTrainDataset(root, "train", crop_size=32, label_source="annotations")
    person = VOC_CLASSES.index("person") - 1
    assert by_mask.labels["a"][person] == 0 and by_xml.labels["a"][person] == 1
    assert np.array_equal(by_mask.labels["b"], by_xml.labels["b"])  # no XML: its mask


def test_cli_runs_log_the_recipe(tmp_path):
    import train
    from tests.fixtures import make_standard_voc_tree
    from tests.test_cli import run, train_args

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    work = tmp_path / "run"
    assert (
        run(
            train,
            train_args(
                root, work, "--max-iters", "1", "--eval-every", "1", "--seg-start-iter", "0"
            ),
        )
        == 0
    )
    text = (work / "train.log").read_text()
    assert "recipe configs/voc_vit_b.yaml" in text
    assert yaml.safe_load((work / "config.yaml").read_text())["recipe"] == "configs/voc_vit_b.yaml"


# ---- the optimised step equals a straightforward one ----
def test_optimised_step_gives_the_losses_and_gradients_of_a_straightforward_step(monkeypatch):
    """Shortcuts: the main pass doubles as the scale-1.0 CAM pass, and the decoder does not run
    while no active term reads it. The straightforward step runs the CAM passes separately and
    the decoder always. Tolerance 1e-5: the same float32 maths, batched differently (B vs 2B
    rows per matmul) may round differently in the last bits."""
    import toco.train.engine as engine

    cfg = tiny_cfg(seg_start_iter=1, cam_scales=(1.0, 0.5, 1.5))
    fast, ref = trainers(cfg, zero_weight=False)

    def straightforward(cam_fn, images, scales, flip=True, given=None):
        return multi_scale_cam(cam_fn, images, scales, flip)

    grads = {"fast": record_gradients(fast), "ref": record_gradients(ref)}
    with monkeypatch.context() as m:
        m.setattr(engine, "multi_scale_cam", straightforward)
        m.setattr(type(ref.model), "segment", lambda self, feats: self.decoder(feats.tokens))
        for module in ref.loss_modules:
            module.needs_decoder = True  # always run the decoder, as the official step does
        logged_ref = [ref.train_step(tiny_batch(t), t) for t in range(2)]
    logged_fast = [fast.train_step(tiny_batch(t), t) for t in range(2)]
    for a, b in zip(logged_fast, logged_ref):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    for step_fast, step_ref in zip(grads["fast"], grads["ref"]):
        for gf, gr in zip(step_fast, step_ref):
            torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-7)


def test_given_scale_one_maps_equal_a_separate_pass():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), num_classes=7)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        own = model.cams(images)
        separate = multi_scale_cam(model.cams, images, (1.0, 0.5))
        reused = multi_scale_cam(model.cams, images, (1.0, 0.5), given=own)
    for a, b in zip(separate, reused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- CPU threads never compete with the data-loader workers ----
@pytest.mark.parametrize(
    "cores, workers, procs, expected",
    [(2, 1, 1, 1), (2, 0, 1, 2), (8, 2, 1, 6), (8, 2, 2, 2), (2, 4, 1, 1), (4, 0, 4, 1)],
)
def test_default_threads_leave_room_for_workers(monkeypatch, cores, workers, procs, expected):
    import toco.runtime as runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    cfg = tiny_cfg(num_workers=workers)
    threads, why = runtime.cpu_threads(cfg, torch.device("cpu"), procs)
    assert threads == expected and f"{cores} cores" in why
    assert runtime.cpu_threads(tiny_cfg(threads=3), torch.device("cpu"))[0] == 3


def test_compiled_blocks_compute_the_same_tokens():
    from toco.build import compile_backbone

    torch.manual_seed(0)
    model = build_model(tiny_cfg(), num_classes=7)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = model.encode(images)
        compile_backbone(model, "default", backend="eager")
        for size in (32, 48):  # two token counts, one dynamic graph
            compiled = model.encode(torch.nn.functional.interpolate(images, size=size))
        compiled = model.encode(images)
    torch.testing.assert_close(compiled.tokens, plain.tokens)
    assert set(model.state_dict()) == set(build_model(tiny_cfg(), num_classes=7).state_dict())


def test_backbone_uses_fused_attention():
    model = build_model(tiny_cfg(), num_classes=7)
    assert all(block.attn.fused_attn for block in model.backbone.vit.blocks)


def test_configs_saved_before_a_setting_existed_keep_their_behaviour():
    saved = {
        k: v
        for k, v in tiny_cfg().to_dict().items()
        if k not in ("input_norm", "dormant_terms", "par_input", "ptc_box")
    }
    cfg = TrainConfig.from_saved(saved)
    assert (cfg.input_norm, cfg.dormant_terms, cfg.par_input, cfg.ptc_box) == (
        "imagenet",
        "skip",
        "float",
        "grid",
    )
    cfg = TrainConfig.from_saved({**saved, "reference_quirks": True})
    assert cfg.ptc_box == "pixels"
    full = tiny_cfg(par_input="uint8").to_dict()
    assert TrainConfig.from_saved(full) == TrainConfig.from_dict(full)  # today's: unchanged


def test_grad_checkpointing_gives_the_same_step(monkeypatch):
    """Recomputing the blocks in backward changes memory, not numbers (same kernels, same
    order): losses and gradients agree to float rounding."""
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    plain, _ = trainers(tiny_cfg(seg_start_iter=0))
    torch.manual_seed(0)
    cfg = tiny_cfg(seg_start_iter=0, grad_checkpointing=True)
    ckpt = Trainer(
        cfg, build_model(cfg, num_classes=7), build_loss_modules(cfg), torch.device("cpu")
    )
    assert ckpt.model.backbone.grad_checkpointing
    grads = {"plain": record_gradients(plain), "ckpt": record_gradients(ckpt)}
    for name, trainer in (("plain", plain), ("ckpt", ckpt)):
        grads[name + "_loss"] = trainer.train_step(tiny_batch(0), 0)["total"]
    assert calls, "no block was checkpointed"
    assert grads["plain_loss"] == pytest.approx(grads["ckpt_loss"], rel=1e-6)
    for a, b in zip(grads["plain"][0], grads["ckpt"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
