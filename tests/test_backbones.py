"""Foundation backbones: each timm family's tokens equal its own forward; training, CAM/CTC/PTC
shapes on the family's patch grid, evaluation at any size, freezing and layer-wise LR decay.

One tiny random-weight model per family (3 blocks, width 32), re-initialised with non-trivial
values so that LayerScale (DINOv2), zero-initialised tokens and unit norms hide nothing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from models.backbone import IMAGENET_MEAN, IMAGENET_STD, ViTBackbone
from models.network import ToCoNet
from toco.build import build_loss_modules
from toco.config import TrainConfig, parse_config
from toco.errors import ConfigError
from toco.method.inference import predict_cams, predict_seg_logits
from toco.method.step import LossModule
from toco.train.engine import Trainer, build_optimizer

TINY = dict(depth=3, embed_dim=32, num_heads=2)
# family -> (timm name, overrides); patch 14 for DINOv2 and EVA-02.
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=64)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56)),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=64)),
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=64)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56)),
}
# Also checked token for token: a distillation token, and a SigLIP pooled by the token mean.
PARITY_ONLY = {
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64)),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", dict(img_size=64)),
}
NUM_CLASSES = 4


def tiny_backbone(family: str, seed: int = 0, **kwargs) -> ViTBackbone:
    name, overrides = {**FAMILIES, **PARITY_ONLY}[family]
    torch.manual_seed(seed)
    bb = ViTBackbone(name, aux_layer=1, **TINY, **overrides, **kwargs)
    with torch.no_grad():
        for n, p in bb.named_parameters():
            scale_like = p.dim() == 1 and any(k in n for k in ("norm", "gamma", "ls"))
            p.normal_(1.0 if scale_like else 0.0, 0.1)
    return bb


def timm_reference(bb: ViTBackbone, x: torch.Tensor):
    """(final tokens, aux map, summary token) from timm's own forward_features/intermediates."""
    vit = bb.vit
    with torch.no_grad():
        final = vit.forward_features(x)
        _, inter = vit.forward_intermediates(
            x, indices=[bb.aux_index], norm=False, output_fmt="NCHW"
        )
        summary = vit.forward_head(final, pre_logits=True) if vit.cls_token is None else None
        if bb.norm_tokens_after_pooling:
            final = vit.fc_norm(final)
        summary = final[:, 0] if summary is None else summary
    return final[:, vit.num_prefix_tokens :], inter[0], summary


@pytest.mark.parametrize("family", list(FAMILIES) + list(PARITY_ONLY))
def test_encoder_equals_timm_forward_token_for_token(family):
    bb = tiny_backbone(family, pos_embed_antialias=True).eval()
    p, native = bb.patch_size, bb.vit.patch_embed.img_size[0]
    # native grid, a larger one and a smaller, non-square one (position table shrunk)
    for h, w in [(native, native), (native + 2 * p, native + p), (2 * p, 3 * p)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            out = bb(x)
        tokens, aux, summary = timm_reference(bb, x)
        assert out.tokens.shape == (2, 32, h // p, w // p)
        torch.testing.assert_close(out.tokens.flatten(2).transpose(1, 2), tokens, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.aux_tokens, aux, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.cls, summary, rtol=0, atol=1e-5)


def test_toco_default_resize_differs_from_timm_at_every_resized_grid():
    # PyTorch's antialiased bicubic (timm's default) uses PIL's kernel (a = -0.5) even when
    # enlarging; ToCo's resize is plain bicubic (a = -0.75). Same tokens only on the native grid.
    bb = tiny_backbone("dinov2").eval()
    p, native = bb.patch_size, bb.vit.patch_embed.img_size[0]
    with torch.no_grad():
        for h, w, same in [(native, native, True), (6 * p, 5 * p, False), (2 * p, 3 * p, False)]:
            x = torch.randn(1, 3, h, w)
            diff = bb(x).tokens.flatten(2).transpose(1, 2) - timm_reference(bb, x)[0]
            assert (diff.abs().max() < 1e-5) == same, (h, w)


def test_siglip_summary_is_its_attention_pool():
    bb = tiny_backbone("siglip").eval()
    assert bb.vit.cls_token is None and bb.vit.attn_pool is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = bb(x)
        seq = out.tokens.flatten(2).transpose(1, 2)  # final normed tokens, no prefix
        torch.testing.assert_close(out.cls, bb.vit.attn_pool(seq), rtol=0, atol=1e-6)


class Probe(LossModule):
    """Records the tensors a step hands to the losses (and forces the lazy ones)."""

    def __init__(self) -> None:
        super().__init__(weight=1.0)
        self.seen: dict = {}

    def compute(self, state):
        self.seen = {
            "cam": state.cam.shape,
            "tokens": state.feats.tokens.shape,
            "aux": state.feats.aux_tokens.shape,
            "cls": state.feats.cls.shape,
            "token_label": state.token_label.shape,
            "seg": state.seg_logits.shape,
            "pseudo": state.pseudo_label.shape,
            "student": state.ctc.student.shape,
            "teacher": state.ctc.teacher.shape,
            "flags": state.ctc.flags.shape,
            "raw_cams": [c.shape for c in state.model.cams(state.images)],
        }
        return {}


def tiny_config(patch: int, **overrides) -> TrainConfig:
    """All losses on from iteration 0, full LR at once (a 1e-6 warm-up start moves nothing)."""
    values = dict(
        pretrained="none",
        aux_layer=1,
        crop_size=4 * patch,
        local_crop_size=2 * patch,
        num_local_crops=2,
        batch_size=2,
        decoder_dim=8,
        cam_scales=(1.0, 0.5),
        par_iters=2,
        par_dilations=(1, 2),
        seg_start_iter=0,
        contrast_start_iter=0,
        w_reg=0.05,
        warmup_iters=1,
        warmup_ratio=1.0,
        lr=1e-3,
        device="cpu",
    )
    return TrainConfig(**{**values, **overrides}).validate()


def batch(size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def img() -> torch.Tensor:
        return torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)

    return {
        "image": img(),
        "view2": img(),
        "local_view": img(),
        "cls_label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        "img_box": torch.tensor([[0, size, 0, size], [2, size - 3, 0, size - 1]]),
    }


def tiny_trainer(family: str, probe: LossModule | None = None, **overrides):
    bb = tiny_backbone(family, trainable_blocks=overrides.pop("trainable_blocks", None))
    model = ToCoNet(bb, NUM_CLASSES, decoder_dim=8, ctc_out_dim=16)
    cfg = tiny_config(bb.patch_size, **overrides)
    losses = build_loss_modules(cfg) + ([probe] if probe else [])
    return Trainer(cfg, model, losses, torch.device("cpu")), cfg


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_training_step_with_all_losses_and_token_grid_shapes(family):
    probe = Probe()
    trainer, cfg = tiny_trainer(family, probe)
    model, p = trainer.model, trainer.model.patch_size
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    log = trainer.train_step(batch(cfg.crop_size), 0)
    assert {"cls", "cls_aux", "ptc", "ctc", "seg", "reg"} <= set(log)
    assert all(math.isfinite(v) for v in log.values())
    g, b, v, c = 4, 2, cfg.num_local_crops, NUM_CLASSES - 1  # 4x4 tokens of p px
    s = probe.seen
    assert s["tokens"] == s["aux"] == (b, 32, g, g) and s["cls"] == (b, 32)
    assert s["raw_cams"] == [(b, c, g, g)] * 2
    assert s["cam"] == (b, c, 4 * p, 4 * p) and s["pseudo"] == (b, 4 * p, 4 * p)
    assert s["token_label"] == (b, g, g) and s["seg"] == (b, NUM_CLASSES, g, g)
    assert s["student"] == ((2 + v) * b, 16) and s["teacher"] == (2 * b, 16)
    assert s["flags"] == (b, 2 + v)
    changed = {n for n, t in model.named_parameters() if not torch.equal(t, before[n])}
    # every block, the class/summary path and the heads were trained
    assert {f"backbone.vit.blocks.{i}.mlp.fc1.weight" for i in range(3)} <= changed
    assert {
        "classifier.conv.weight",
        "aux_classifier.conv.weight",
        "decoder.conv8.weight",
        "proj_head.mlp.0.weight",
    } <= changed
    assert "backbone.vit.pos_embed" not in changed  # frozen, as in ToCo


@pytest.mark.parametrize("family", list(FAMILIES))
def test_evaluation_at_a_size_that_is_not_a_multiple_of_the_patch(family):
    torch.manual_seed(0)
    model = ToCoNet(tiny_backbone(family), NUM_CLASSES, decoder_dim=8).eval()
    p = model.patch_size
    h, w = 3 * p + 5, 2 * p + 3
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2:]))
    image = torch.rand(1, 3, h, w)
    seg = predict_seg_logits(model, image, scales=(1.0, 0.75), flip=True)
    cam, cam_aux = predict_cams(model, image, scales=(1.0, 0.5), flip=True)
    assert seg.shape == (1, NUM_CLASSES, h, w) and torch.isfinite(seg).all()
    assert cam.shape == cam_aux.shape == (1, NUM_CLASSES - 1, h, w)
    assert torch.isfinite(cam).all() and cam.min() >= 0
    # every encoder pass saw an input padded up to the next multiple of the model's patch
    assert seen and all(sh % p == 0 and sw % p == 0 for sh, sw in seen)
    assert (4 * p, 3 * p) in seen  # the scale-1 pass: h, w padded by less than one patch


@pytest.mark.parametrize(
    "family,trainable_blocks", [("dinov2", 0), ("eva02", 0), ("clip", 1), ("dinov2_reg", 2)]
)
def test_frozen_parameters_stay_bit_identical_after_a_step(family, trainable_blocks):
    trainer, cfg = tiny_trainer(family, trainable_blocks=trainable_blocks)
    model = trainer.model
    depth = model.backbone.depth
    frozen = {n for n, t in model.backbone.named_parameters() if not t.requires_grad}
    first_trained = depth - trainable_blocks
    for n, _ in model.backbone.named_parameters():
        in_last_blocks = any(n.startswith(f"vit.blocks.{i}.") for i in range(first_trained, depth))
        tail = n.startswith(("vit.norm.", "vit.fc_norm.", "vit.attn_pool."))
        assert (n in frozen) == (not in_last_blocks and not (trainable_blocks and tail)), n
    optimised = {id(t) for g in trainer.optimizer.param_groups for t in g["params"]}
    assert all(id(t) not in optimised for n, t in model.backbone.named_parameters() if n in frozen)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    log = trainer.train_step(batch(cfg.crop_size), 0)
    assert all(math.isfinite(v) for v in log.values())
    for n, t in model.backbone.named_parameters():
        assert torch.equal(t, before["backbone." + n]) == (n in frozen), n
    assert not torch.equal(model.classifier.conv.weight, before["classifier.conv.weight"])
    with torch.enable_grad():
        out = model.encode(torch.rand(1, 3, cfg.crop_size, cfg.crop_size))
    # no autograd graph through frozen parts: aux tokens (block 1) carry one iff block 1 trains
    assert out.aux_tokens.requires_grad == (1 >= first_trained)
    assert out.tokens.requires_grad == (trainable_blocks > 0)


def test_layer_decay_gives_each_block_its_hand_computed_lr():
    bb = tiny_backbone("dinov2")
    model = ToCoNet(bb, NUM_CLASSES, decoder_dim=8)
    cfg = tiny_config(14, layer_decay=0.5, lr=1e-3, head_lr_mult=10.0)
    opt = build_optimizer(model, cfg)
    lr_of = {id(t): g["lr"] for g in opt.param_groups for t in g["params"]}
    named = dict(model.named_parameters())
    # depth 3: embeddings 0.5^4, block i 0.5^(3-i), final norm 0.5^0 (BEiT's layer ids)
    expected = {
        "backbone.vit.cls_token": 1e-3 / 16,
        "backbone.vit.patch_embed.proj.weight": 1e-3 / 16,
        "backbone.vit.blocks.0.attn.qkv.weight": 1e-3 / 8,
        "backbone.vit.blocks.1.norm1.weight": 1e-3 / 4,
        "backbone.vit.blocks.2.mlp.fc2.bias": 1e-3 / 2,
        "backbone.vit.norm.weight": 1e-3,
        "classifier.conv.weight": 1e-2,
        "decoder.conv6.weight": 1e-2,
    }
    for name, lr in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(lr, rel=1e-12), name
    assert id(named["backbone.vit.pos_embed"]) not in lr_of
    assert opt.param_groups[0]["lr"] == 1e-3  # group 0: the undecayed backbone LR
    assert all(g["weight_decay"] == cfg.weight_decay for g in opt.param_groups)
    trainable = {
        id(t)
        for n, t in model.named_parameters()
        if t.requires_grad and not n.startswith("proj_head_teacher")
    }
    assert set(lr_of) == trainable and len(lr_of) == sum(len(g["params"]) for g in opt.param_groups)


def test_layer_decay_with_trainable_blocks_groups_only_the_trained_ones():
    model = ToCoNet(tiny_backbone("eva02", trainable_blocks=1), NUM_CLASSES, decoder_dim=8)
    opt = build_optimizer(model, tiny_config(14, layer_decay=0.5, lr=1e-3))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 5e-4, 1e-2, 1e-2])


def test_default_groups_are_tocos_four():
    model = ToCoNet(tiny_backbone("deit"), NUM_CLASSES, decoder_dim=8)
    cfg = tiny_config(16, lr=6e-5)
    extra = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(model, cfg, extra)
    want = model.param_groups()
    want[2] = want[2] + extra
    assert [[id(t) for t in g["params"]] for g in opt.param_groups] == [
        [id(t) for t in g] for g in want
    ]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([6e-5, 6e-5, 6e-4, 6e-4])
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    assert set(opt.param_groups[0]) == set(opt.param_groups[3])  # no extra keys added


def test_input_normalisation_follows_the_backbone_unless_imagenet_is_asked():
    from toco.build import build_model

    base = dict(
        backbone="vit_base_patch16_clip_224.openai",
        pretrained="none",
        backbone_depth=1,
        aux_layer=0,
        decoder_dim=8,
    )
    clip = build_model(TrainConfig(**base).validate(), NUM_CLASSES)
    assert clip.pixel_mean.flatten().tolist() == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert clip.pixel_std.flatten().tolist() == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    toco = build_model(TrainConfig(**base, input_norm="imagenet").validate(), NUM_CLASSES)
    assert toco.pixel_mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert toco.pixel_std.flatten().tolist() == pytest.approx(IMAGENET_STD)


def test_freeze_flags_reach_the_model_and_the_recorded_config():
    from toco.build import build_model

    cfg, _ = parse_config(
        [
            "--backbone",
            "deit_tiny_patch16_224",
            "--pretrained",
            "none",
            "--backbone-depth",
            "2",
            "--aux-layer",
            "0",
            "--freeze-backbone",
            "--layer-decay",
            "0.75",
            "--input-norm",
            "imagenet",
            "--decoder-dim",
            "8",
        ]
    )
    recorded = cfg.to_dict()
    assert recorded["freeze_backbone"] is True and recorded["layer_decay"] == 0.75
    assert recorded["input_norm"] == "imagenet" and recorded["trainable_blocks"] is None
    model = build_model(cfg, NUM_CLASSES)
    assert not any(t.requires_grad for t in model.backbone.parameters())
    cfg2, _ = parse_config(
        [
            "--backbone",
            "deit_tiny_patch16_224",
            "--pretrained",
            "none",
            "--backbone-depth",
            "2",
            "--aux-layer",
            "0",
            "--trainable-blocks",
            "1",
            "--decoder-dim",
            "8",
        ]
    )
    trained = {
        n for n, t in build_model(cfg2, NUM_CLASSES).backbone.named_parameters() if t.requires_grad
    }
    assert trained and all(n.startswith(("vit.blocks.1.", "vit.norm.")) for n in trained)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--freeze-backbone", "--trainable-blocks", "2"], "contradicts --trainable-blocks 2"),
        (["--layer-decay", "0"], "layer_decay must be in"),
        (["--layer-decay", "1.5"], "layer_decay must be in"),
        (["--trainable-blocks", "-1"], "trainable_blocks must be >= 0"),
        (["--input-norm", "clip"], "invalid choice"),
    ],
)
def test_bad_backbone_flags_are_one_line_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_unsupported_backbones_stop_at_start_up_with_one_line():
    with pytest.raises(ConfigError, match=r"trainable_blocks 4 out of range .* \(0..3\)"):
        tiny_backbone("deit", trainable_blocks=4)
    for name in ("beit_base_patch16_224", "vit_base_r50_s16_224", "samvit_base_patch16"):
        with pytest.raises(ConfigError, match=f"'{name}' is not one of the timm ViTs ToCo runs"):
            ViTBackbone(name, depth=1)
    # no class token and no pooled embedding: nothing can play the class token's role in CTC
    with pytest.raises(ConfigError, match="neither a class token nor a pooled image embedding"):
        ViTBackbone("vit_base_patch16_siglip_224", global_pool="", **TINY)
    with pytest.raises(ConfigError, match="patch dropout"):
        ViTBackbone("deit_tiny_patch16_224", patch_drop_rate=0.5, **TINY)


@pytest.mark.parametrize("recipe,grid", [("voc_dinov2_b", 32), ("voc_clip_b", 20)])
def test_backbone_recipes_load_and_build(recipe, grid, tmp_path):
    from toco.build import build_model
    from toco.config import CONFIG_DIR

    cfg, _ = parse_config(
        [
            "--config",
            str(CONFIG_DIR / f"{recipe}.yaml"),
            "--data-root",
            str(tmp_path),
            "--pretrained",
            "none",
            "--backbone-depth",
            "6",
        ]
    )
    assert cfg.input_norm == "backbone" and cfg.layer_decay < 1
    model = build_model(cfg, 21)
    assert cfg.crop_size // model.patch_size == grid and cfg.crop_size % model.patch_size == 0
    opt = build_optimizer(model, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr)  # final norm: undecayed
    frozen = [n for n, t in model.backbone.named_parameters() if not t.requires_grad]
    if cfg.trainable_blocks is None:
        assert frozen == ["vit.pos_embed"]
    else:
        assert "vit.blocks.0.attn.qkv.weight" in frozen and len(frozen) > 1


def test_local_weights_file_loads_a_patch14_rope_backbone_exactly(tmp_path):
    from safetensors.torch import save_file

    src = tiny_backbone("eva02")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.vit.state_dict().items()}, str(path))
    dst = ViTBackbone(
        FAMILIES["eva02"][0], pretrained=str(path), aux_layer=1, **TINY, **FAMILIES["eva02"][1]
    )
    for (k, a), b in zip(src.vit.state_dict().items(), dst.vit.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "backbone,depth", [("eva02_tiny_patch14_224", 2), ("vit_base_patch16_siglip_224", 1)]
)
def test_train_evaluate_export_end_to_end(backbone, depth, tmp_path):
    """train.py → evaluate.py (sizes off the patch grid) → release export, one odd family each:
    patch 14 + rotary embeddings + fc_norm tokens, and no class token (attention pool)."""
    import evaluate
    import train
    from tests.fixtures import make_standard_voc_tree
    from tests.test_cli import run, train_args
    from toco.export import export_release, load_release

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    work = tmp_path / "run"
    patch = 14 if "patch14" in backbone else 16
    argv = train_args(
        root,
        work,
        "--max-iters",
        "2",
        "--eval-every",
        "2",
        "--seg-start-iter",
        "1",
        "--warmup-iters",
        "1",
        "--threads",
        "1",
        "--backbone",
        backbone,
        "--crop-size",
        str(4 * patch),
        "--local-crop-size",
        str(2 * patch),
        "--backbone-depth",
        str(depth),
        "--trainable-blocks",
        "1",
        "--layer-decay",
        "0.8",
        "--input-norm",
        "backbone",
    )
    assert run(train, argv) == 0
    recorded = yaml.safe_load((work / "config.yaml").read_text())
    assert recorded["trainable_blocks"] == 1 and recorded["layer_decay"] == 0.8
    assert recorded["input_norm"] == "backbone"
    ckpt = str(work / "checkpoints" / "last.pt")
    for mode in ("seg", "cam"):
        out = tmp_path / f"{mode}.json"
        assert (
            run(
                evaluate,
                [
                    "--checkpoint",
                    ckpt,
                    "--mode",
                    mode,
                    "--device",
                    "cpu",
                    "--output-json",
                    str(out),
                ],
            )
            == 0
        )
        assert 0 <= json.loads(out.read_text())["miou"] <= 100  # percent
    model, _ = load_release(str(export_release(ckpt, str(tmp_path / "m.safetensors"))))
    state = torch.load(ckpt, weights_only=True)["model"]
    for k, v in model.state_dict().items():
        if not k.startswith("proj_head_teacher."):
            assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--backbone", "beit_base_patch16_224"], "is not one of the timm ViTs ToCo runs"),
        (["--backbone-depth", "2", "--trainable-blocks", "3"], "trainable_blocks 3 out of range"),
    ],
)
def test_train_refuses_an_unusable_backbone_with_one_line(extra, needle, tmp_path, capsys):
    import train
    from tests.fixtures import make_standard_voc_tree
    from tests.test_cli import assert_user_error, run, train_args

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    code = run(train, train_args(root, tmp_path / "run", "--max-iters", "1", *extra))
    assert_user_error(capsys, code, needle)
