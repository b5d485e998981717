"""toco.convert: official ToCo checkpoints give the official network's numbers with our code.

The fixtures (tests/official_fixtures/*.pt, made by scripts/make_official_fixture.py from
rulixiang/ToCo at e13514d) hold a small official network's weights and what the official
functions computed on fixed inputs. Here the weights are written as an official .pth, converted,
and run through our model, CAM, PAR, pseudo-label and evaluation code.

Tolerance: float32 round-off only. Both sides compute the same maths in a different order
(fused SDPA attention vs the official explicit softmax(QK^T)V, our normalisation of [0, 1] images
vs the official normalised inputs, our PAR's shifted slices vs its dilated convolutions). The
largest differences seen (CPU, fp32): 1e-6 on image logits up to 5, 3e-6 on raw CAMs up to 7,
1e-7 on segmentation logits up to 0.3 and on CTC outputs up to 0.2, 1.2e-6 on the [0, 1] fused
CAMs: a few ulps. TOL = 1e-4 leaves a wide margin for other CPUs/BLAS yet stays far below what
a wrong mapping gives (0.2 to 10 in the mutation tests). Labels must match exactly, except at
pixels whose official top-2 logit margin, or CAM distance to the threshold, is within TOL (none
so far: every label matches).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from models.backbone import ViTBackbone
from models.network import ToCoNet
from toco import convert
from toco.build import build_model
from toco.checkpoint import save_checkpoint
from toco.cli import run_cli
from toco.config import TrainConfig
from toco.errors import UserError
from toco.evaluation.protocol import build_protocol
from toco.export import load_release
from toco.method.cam import cam_to_label, multi_scale_cam, refine_cams_with_bkg
from toco.method.inference import cams_to_prediction
from toco.method.par import PAR
from toco.train.engine import truncate_like_reference

FIXTURES = Path(__file__).parent / "official_fixtures"
TOL = 1e-4
# Our timm backbone for each fixture: timm's `test_vit` has the ViT fixtures' sizes; the DeiT
# fixture is timm's DeiT-tiny layout at the fixture's width (built directly, see below).
TEST_VIT = "test_vit"
DEIT_OVERRIDES = dict(embed_dim=64, num_heads=2, depth=3, img_size=224)


def load_fixture(name: str) -> dict:
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    fx["state"] = {k: v["q"].float() * 2.0 ** v["exp"] for k, v in fx["weights"].items()}
    return fx


@pytest.fixture(scope="module", params=["vit_voc", "deit_voc", "vit_coco"])
def fixture(request) -> dict:
    return load_fixture(request.param)


def write_official(state: dict, path: Path, ddp: bool = True) -> Path:
    """An official checkpoint as the official training saves it (DDP: `module.` prefixes)."""
    torch.save({("module." + k if ddp else k): v for k, v in state.items()}, path)
    return path


def deit_model(num_classes: int) -> ToCoNet:
    backbone = ViTBackbone("deit_tiny_patch16_224", aux_layer=-3, **DEIT_OVERRIDES)
    return ToCoNet(backbone, num_classes, decoder_dim=16, ctc_out_dim=16, ctc_hidden_dim=16)


def converted_model(fx: dict, tmp_path: Path, state: dict | None = None) -> ToCoNet:
    """Our model with the fixture's (or `state`'s) official tensors converted onto it."""
    state = fx["state"] if state is None else state
    if fx["family"] == "deit":
        model = deit_model(fx["num_classes"])
        depth = convert.check_keys(state, "fixture")
        convert.infer_arch(state, depth, "fixture")
        model.load_state_dict(convert.convert_state_dict(state))
        return model.eval()
    path = write_official(state, tmp_path / f"toco_{fx['name']}.pth")
    converted = convert.convert_official(path, backbone=TEST_VIT)
    return convert.build_from_config(converted.config, converted.tensors, path)[0]


THRESHOLDS = {21: dict(high=0.7, low=0.25, bkg=0.5), 81: dict(high=0.65, low=0.25, bkg=0.45)}


def errors(model: ToCoNet, fx: dict) -> dict[str, float]:
    """Largest |ours - official| of every recorded float output; label mismatches counted
    where the official value is not within TOL of a decision boundary."""
    out, n = fx["outputs"], fx["num_classes"]
    thre = THRESHOLDS[n]
    err: dict[str, float] = {}

    def close(name: str, ours: torch.Tensor) -> None:
        err[name] = (ours - out[name]).abs().max().item()

    images = out["pixels"].float() / 255
    with torch.no_grad():
        feats = model.encode(images)
        logits, aux_logits = model.classify(feats)
        close("cls", logits)
        close("cls_aux", aux_logits)
        close("seg", model.segment(feats))
        close("ctc_student", model.project(feats.cls))
        close("ctc_teacher", model.project_teacher(feats.cls))
        h, w = images.shape[-2:]
        for s in (1.0, 0.5, 1.5):
            x = (
                images
                if s == 1.0
                else F.interpolate(
                    images, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False
                )
            )
            cam, cam_aux = model.cams(torch.cat([x, x.flip(-1)]))
            close(f"raw_cam_{s}", cam)
            close(f"raw_cam_aux_{s}", cam_aux)
        cam, cam_aux = multi_scale_cam(model.cams, images, (1.0, 0.5, 1.5))
        idx = out["present"][:, :, None, None].expand(-1, -1, h, w)
        close("cam_present", cam.gather(1, idx))
        close("cam_aux_present", cam_aux.gather(1, idx))
        valid, _ = cam_to_label(
            cam,
            out["cls_label"],
            out["img_box"],
            thre["bkg"],
            thre["high"],
            thre["low"],
            ignore_mid=True,
        )
        label = refine_cams_with_bkg(
            PAR(10, (1, 2, 4, 8, 12, 24)),
            truncate_like_reference(images),
            valid,
            out["cls_label"],
            out["img_box"],
            thre["high"],
            thre["low"],
            2,
        )
        err["pseudo_label_pixels"] = (label != out["pseudo_label"].long()).sum().item()
        err.update(validation_errors(model, fx))
    return err


def validation_errors(model: ToCoNet, fx: dict) -> dict[str, float]:
    out, n = fx["outputs"], fx["num_classes"]
    cfg = TrainConfig(dataset="synthetic", val_scales=(1.0, 0.5, 1.5))
    images = out["val_pixels"].float() / 255
    err = {}
    # The in-training validation at the fixture's 64-px square (every scale a multiple of the
    # patch: our default padding pads nothing); the official multi-scale tools floor.
    train_val = build_protocol("train-val", cfg, size=64)
    cam, _ = train_val.cams(model, images)
    err["val_cam_present"] = (
        (cam[:, out["val_present"]] - out["val_cam_present"]).abs().max().item()
    )
    value = (cam * out["val_cls_label"][:, :, None, None]).amax(1)
    decided = (value - THRESHOLDS[n]["bkg"]).abs() > TOL
    label = cams_to_prediction(cam, out["val_cls_label"], THRESHOLDS[n]["bkg"])
    err["val_cam_label_pixels"] = ((label != out["val_cam_label"].long()) & decided).sum().item()
    ms = build_protocol("voc-ms" if n == 21 else "coco-ms", cfg, patch_fit="floor")
    for key, protocol in (("val_seg", train_val), ("ms_seg", ms)):
        pred = protocol.seg_logits(model, images).argmax(1)
        decided = out[f"{key}_margin"] > TOL
        err[f"{key}_pixels"] = ((pred != out[f"{key}_pred"].long()) & decided).sum().item()
    return err


def assert_matches(err: dict[str, float]) -> None:
    bad = {k: v for k, v in err.items() if (v > 0 if k.endswith("_pixels") else v > TOL)}
    assert not bad, f"differs from the official outputs: {bad}"


def test_converted_official_network_gives_the_official_outputs(fixture, tmp_path):
    err = errors(converted_model(fixture, tmp_path), fixture)
    assert_matches(err)
    assert set(err) >= {"cls", "seg", "cam_present", "pseudo_label_pixels", "ms_seg_pixels"}


def swap_blocks(state: dict, a: int, b: int) -> dict:
    out = dict(state)
    for k in state:
        for i, j in ((a, b), (b, a)):
            prefix = f"encoder.blocks.{i}."
            if k.startswith(prefix):
                out[f"encoder.blocks.{j}." + k.removeprefix(prefix)] = state[k]
    return out


MUTATIONS = {
    "blocks 1 and 2 swapped": lambda s: swap_blocks(s, 1, 2),
    "attention projection transposed": lambda s: {
        **s,
        "encoder.blocks.0.attn.proj.weight": s["encoder.blocks.0.attn.proj.weight"].t(),
    },
    "classifier and aux classifier swapped": lambda s: {
        **s,
        "classifier.weight": s["aux_classifier.weight"],
        "aux_classifier.weight": s["classifier.weight"],
    },
    "teacher and student CTC heads swapped": lambda s: {
        **s,
        **{
            k.replace("proj_head_t.", "proj_head."): v
            for k, v in s.items()
            if k.startswith("proj_head_t.")
        },
        **{
            k.replace("proj_head.", "proj_head_t."): v
            for k, v in s.items()
            if k.startswith("proj_head.")
        },
    },
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_wrong_mapping_fails_the_comparison(mutation, tmp_path):
    fx = load_fixture("vit_voc")
    err = errors(converted_model(fx, tmp_path, MUTATIONS[mutation](fx["state"])), fx)
    floats = {k: v for k, v in err.items() if not k.endswith("_pixels")}
    assert max(floats.values()) > 100 * TOL, floats
    with pytest.raises(AssertionError):
        assert_matches(err)


def test_a_transposed_classifier_is_refused_by_shape(tmp_path):
    fx = load_fixture("vit_voc")
    state = dict(fx["state"])
    state["classifier.weight"] = state["classifier.weight"].flatten(1).t()[:, :, None, None]
    path = write_official(state, tmp_path / "toco_vit.pth")
    with pytest.raises(UserError, match="classifier"):
        convert.convert_official(path, backbone=TEST_VIT)


def test_cli_writes_a_release_that_loads_with_the_official_weights(tmp_path, capsys):
    fx = load_fixture("vit_coco")
    src = write_official(fx["state"], tmp_path / "toco_vit-b_coco_model_iter_80000.pth")
    out = tmp_path / "model.safetensors"
    assert (
        convert.main(
            [str(src), "--from", "toco-official", "--backbone", TEST_VIT, "--output", str(out)]
        )
        == 0
    )
    model, cfg = load_release(str(out))
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["source"] == "toco-official" and meta["iteration"] == "80000"
    assert '"background"' in meta["class_names"] and '"toothbrush"' in meta["class_names"]
    assert not any(k.startswith("proj_head_teacher.") for k in keys)
    # The config is the published COCO recipe with the checkpoint's own sizes.
    assert (cfg.dataset, cfg.input_norm, cfg.bkg_thre, cfg.aux_cam_until_iter) == (
        "coco",
        "imagenet",
        0.45,
        12001,
    )
    assert (cfg.backbone, cfg.backbone_depth, cfg.decoder_dim, cfg.ctc_out_dim) == (
        TEST_VIT,
        3,
        16,
        16,
    )
    err = errors(model, fx)
    err.pop("ctc_teacher")  # releases drop the teacher; load_release keeps a fresh one
    assert_matches(err)


def test_full_size_mapping_covers_every_tensor_of_our_vit_b():
    """The released ViT-B/DeiT-B layout: every official key lands on one of ours, and back."""
    official = convert.expected_keys(12)
    for family, dataset in (("vit", 21), ("deit", 81)):
        arch = convert.OfficialArch(768, 12, 16, 14, 3072, dataset, 512, 2048, 1024)
        config = convert.build_config(arch, family, None, None, None, {}, "ckpt.pth")
        assert config["backbone"] == convert.OFFICIAL_BACKBONES[family]
        assert config["backbone_depth"] is None and config["pretrained"] == "none"
        assert config["input_norm"] == "imagenet" and config["aux_layer"] == -3
        with torch.device("meta"):
            model = build_model(TrainConfig.from_saved(config), dataset, pretrained="none")
        ours = {convert.rename_key(k) for k in official}
        assert ours == set(model.state_dict())


def test_family_comes_from_flag_arguments_or_name(tmp_path):
    assert convert.resolve_family("x.pth", {}, "deit") == "deit"
    assert convert.resolve_family("x.pth", {"backbone": "deit_base_patch16_224"}, None) == "deit"
    assert convert.resolve_family("toco_vit-b_voc.pth", {}, None) == "vit"
    with pytest.raises(UserError, match="--family"):
        convert.resolve_family("model_iter_20000.pth", {}, None)


# ---- foreign files: one line each ----
def refusal(path: Path, capsys) -> str:
    """The CLI's stderr for `path`: exactly one line, exit code 2, no output file."""
    code = run_cli(
        lambda: convert.main(
            [
                str(path),
                "--from",
                "toco-official",
                "--family",
                "vit",
                "--output",
                str(path.parent / "o.safetensors"),
            ]
        )
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (path.parent / "o.safetensors").exists()
    return err


def test_timm_checkpoint_is_refused(tmp_path, capsys):
    import timm

    path = tmp_path / "vit.pth"
    torch.save(timm.create_model(TEST_VIT, pretrained=False).state_dict(), path)
    err = refusal(path, capsys)
    assert "not an official ToCo checkpoint" in err and "timm" in err
    assert "missing encoder.cls_token" in err and "unexpected cls_token" in err


def test_truncated_file_is_refused(tmp_path, capsys):
    full = write_official(load_fixture("vit_voc")["state"], tmp_path / "full.pth")
    path = tmp_path / "toco_vit.pth"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert "cannot be read" in refusal(path, capsys)


def test_own_training_checkpoint_points_to_export(tmp_path, capsys):
    path = tmp_path / "last.pt"
    save_checkpoint(
        {
            "model": {"backbone.vit.cls_token": torch.zeros(1, 1, 4)},
            "trainer": {},
            "iteration": 3,
            "config": {},
        },
        path,
    )
    assert "python -m toco.export" in refusal(path, capsys)


def test_release_and_missing_files_are_refused(tmp_path, capsys):
    release = tmp_path / "model.safetensors"
    release.write_bytes(b"x")
    assert "not an official ToCo checkpoint" in refusal(release, capsys)
    assert "no such file" in refusal(tmp_path / "absent.pth", capsys)


def test_missing_block_tensor_is_named(tmp_path, capsys):
    state = dict(load_fixture("vit_voc")["state"])
    del state["encoder.blocks.1.mlp.fc2.bias"]
    state["encoder.extra"] = torch.zeros(1)
    err = refusal(write_official(state, tmp_path / "toco_vit.pth"), capsys)
    assert "missing encoder.blocks.1.mlp.fc2.bias" in err and "unexpected encoder.extra" in err


def test_official_file_without_ddp_prefix_converts_the_same(tmp_path):
    fx = load_fixture("vit_voc")
    a = convert.read_official(write_official(fx["state"], tmp_path / "a.pth"))[0]
    b = convert.read_official(write_official(fx["state"], tmp_path / "b.pth", ddp=False))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_state_reads_like_our_checkpoints(tmp_path):
    """What evaluation needs to take an official .pth on the fly: model/config/iteration."""
    fx = load_fixture("vit_voc")
    path = write_official(fx["state"], tmp_path / "toco_vit_model_iter_18000.pth")
    assert convert.is_official_checkpoint(path)
    ours = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "config": {}, "iteration": 1}, ours)
    assert not convert.is_official_checkpoint(ours)
    assert not convert.is_official_checkpoint(tmp_path / "absent.pth")
    state = convert.checkpoint_state(path, backbone=TEST_VIT)
    assert state["iteration"] == 18000
    cfg = TrainConfig.from_saved(state["config"])
    model = build_model(cfg, 21, pretrained="none")
    model.load_state_dict(state["model"])
    assert_matches(errors(model.eval(), fx))


def test_evaluate_takes_an_official_checkpoint_as_it_is(tmp_path, capsys):
    """evaluate.py (and every reader of model files) recognises an official checkpoint and
    converts it on the fly; this tiny one is not a released ViT-B, which the converter says."""
    import evaluate
    from toco.cli import run_cli
    from toco.export import load_model_state

    fx = load_fixture("vit_voc")
    path = write_official(fx["state"], tmp_path / "toco_vit_voc_model_iter_20000.pth")
    assert run_cli(lambda: evaluate.main(["--checkpoint", str(path)])) == 2
    err = capsys.readouterr().err.strip()
    assert "not the ViT-B/16 of the released checkpoints; pass --backbone" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(UserError, match="not the ViT-B/16"):
        load_model_state(path)
