"""train.py / evaluate.py end to end on a tiny VOC tree, and their handling of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import evaluate
import train
from tests.fixtures import ImageSpec, boxes_mask, make_voc_tree
from toco.checkpoint import load_checkpoint
from toco.cli import run_cli

TINY = [
    "--backbone",
    "deit_tiny_patch16_224",
    "--backbone-depth",
    "2",
    "--aux-layer",
    "0",
    "--pretrained",
    "none",
    "--crop-size",
    "64",
    "--local-crop-size",
    "32",
    "--num-local-crops",
    "2",
    "--batch-size",
    "2",
    "--decoder-dim",
    "16",
    "--num-workers",
    "0",
    "--cam-scales",
    "1.0",
    "0.5",
    "--val-scales",
    "1.0",
    "--par-iters",
    "2",
    "--par-dilations",
    "1",
    "2",
]


def train_args(root: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        "voc",
        "--data-root",
        str(root),
        "--train-split",
        "train",
        "--val-split",
        "val",
        "--cache-dir",
        str(work.parent / "c"),
        "--work-dir",
        str(work),
        *TINY,
        *extra,
    ]


def run(module, argv: list[str]) -> int:
    return run_cli(lambda: module.main(argv))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """One short run shared by the tests that only read its outputs."""
    base = tmp_path_factory.mktemp("cli")
    from tests.fixtures import make_standard_voc_tree

    root = make_standard_voc_tree(base / "VOC2012")
    work = base / "run"
    argv = train_args(
        root,
        work,
        "--max-iters",
        "4",
        "--seg-start-iter",
        "1",
        "--warmup-iters",
        "2",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--log-every",
        "1",
        "--lr",
        "1e-4",
    )
    assert run(train, argv) == 0
    return root, work


def test_run_folder_holds_everything(trained):
    _, work = trained
    for name in (
        "config.yaml",
        "train.log",
        "metrics.jsonl",
        "final.json",
        "COMPLETE",
        "val_iter000002.txt",
        "val_iter000004.txt",
        "checkpoints/last.pt",
        "preview.png",
    ):
        assert (work / name).exists(), name
    assert (
        (work / "train.log")
        .read_text()
        .splitlines()[-1]
        .endswith(f"validation images: {work / 'preview.png'}")
    )
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    assert cfg["max_iters"] == 4 and cfg["backbone_depth"] == 2
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "total" in r]
    assert [r["iter"] for r in losses] == [1, 2, 3, 4]
    assert all(math.isfinite(r["total"]) for r in losses)
    assert "seg" not in losses[0] and "seg" in losses[1]  # switched on at --seg-start-iter 1
    ckpt = load_checkpoint(work / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == 4 and ckpt["config"]["max_iters"] == 4
    assert {"model", "trainer", "config", "torch_rng"} <= set(ckpt)
    assert {"optimizer", "scheduler", "scaler", "crop_rng"} <= set(ckpt["trainer"])
    table = (work / "val_iter000004.txt").read_text()
    assert "aeroplane" in table and "mIoU" in table


@pytest.mark.parametrize("mode", ["seg", "cam"])
def test_evaluate_writes_json(trained, tmp_path, mode):
    root, work = trained
    out = tmp_path / f"{mode}.json"
    assert (
        run(
            evaluate,
            [
                "--checkpoint",
                str(work / "checkpoints" / "last.pt"),
                "--split",
                "val",
                "--mode",
                mode,
                "--output-json",
                str(out),
            ],
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["mode"] == mode and report["num_images"] == 3
    assert 0 <= report["miou"] <= 100 and len(report["iou"]) == 21
    # classes without ground truth in val (e.g. aeroplane is in img_a: present) are null
    assert report["iou"]["bicycle"] is None and report["iou"]["background"] is not None


def test_resume_continues_to_the_end(trained, tmp_path):
    root, work = trained
    args = train_args(
        root,
        work,
        "--max-iters",
        "6",
        "--seg-start-iter",
        "1",
        "--warmup-iters",
        "2",
        "--eval-every",
        "6",
        "--save-every",
        "2",
    )
    assert run(train, args + ["--resume"]) == 0
    assert load_checkpoint(work / "checkpoints" / "last.pt")["iteration"] == 6


def test_existing_run_is_not_overwritten(trained, capsys):
    root, work = trained
    assert run(train, train_args(root, work, "--max-iters", "1")) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def assert_user_error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_missing_data_root(tmp_path, capsys):
    work = tmp_path / "run"
    code = run(train, train_args(tmp_path / "nowhere", work, "--max-iters", "1"))
    assert_user_error(capsys, code, "nowhere")
    assert not work.exists()


def test_split_naming_missing_images(tmp_path, capsys):
    root = make_voc_tree(
        tmp_path / "voc",
        [ImageSpec("a", boxes_mask(32, 32, [(1, 2, 9, 2, 9)]))],
        {"train": ["a", "ghost"], "val": ["a"]},
    )
    work = tmp_path / "run"
    code = run(train, train_args(root, work, "--max-iters", "1"))
    assert_user_error(capsys, code, "ghost")
    assert not work.exists()


def test_mask_size_mismatch(tmp_path, capsys):
    spec = ImageSpec("a", boxes_mask(32, 32, [(1, 2, 9, 2, 9)]), image_hw=(30, 32))
    root = make_voc_tree(tmp_path / "voc", [spec], {"train": ["a"], "val": ["a"]})
    code = run(train, train_args(root, tmp_path / "run", "--max-iters", "1"))
    assert_user_error(capsys, code, "a.png", "a.jpg")


def test_corrupt_jpeg_stops_training_with_its_name(tmp_path, capsys):
    specs = [ImageSpec(n, boxes_mask(32, 32, [(1, 2, 9, 2, 9)])) for n in ("a", "b")]
    root = make_voc_tree(tmp_path / "voc", specs, {"train": ["a", "b"], "val": ["a"]})
    jpeg = root / "JPEGImages" / "b.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated file, header still readable
    work = tmp_path / "run"
    code = run(train, train_args(root, work, "--max-iters", "2"))
    assert_user_error(capsys, code, "b.jpg")
    assert not (work / "COMPLETE").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--backbone", "vit_tinyy_patch16_224"], "unknown backbone"),
        (["--crop-size", "-3"], "crop_size must be positive"),
        (["--device", "tpu"], "invalid choice"),
        (["--pretrained", "/no/weights.pth"], "no such file"),
    ],
)
def test_bad_flags_stop_before_creating_the_run(tmp_path, capsys, extra, needle):
    from tests.fixtures import make_standard_voc_tree

    root = make_standard_voc_tree(tmp_path / "voc")
    work = tmp_path / "run"
    code = run(train, train_args(root, work, "--max-iters", "1", *extra))
    assert_user_error(capsys, code, needle)
    assert not work.exists()


def test_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"garbage")
    code = run(evaluate, ["--checkpoint", str(bad)])
    assert_user_error(capsys, code, "cannot read checkpoint", "last.pt")


def test_evaluate_exports_predictions_as_palette_pngs(trained, tmp_path):
    import numpy as np
    from PIL import Image

    root, work = trained
    out = tmp_path / "preds"
    assert (
        run(
            evaluate,
            [
                "--checkpoint",
                str(work / "checkpoints" / "last.pt"),
                "--split",
                "val",
                "--save-dir",
                str(out),
                "--output-json",
                str(tmp_path / "s.json"),
            ],
        )
        == 0
    )
    pngs = sorted(p.stem for p in out.glob("*.png"))
    assert pngs == ["img_a", "img_d", "img_e"]
    png = Image.open(out / "img_a.png")
    assert png.mode == "P" and png.size == (60, 40)  # original image size
    assert np.asarray(png).max() < 21


def test_predict_only_on_a_split_without_masks(trained, tmp_path, capsys):
    root, work = trained
    out = tmp_path / "test_preds"
    ckpt = str(work / "checkpoints" / "last.pt")
    assert (
        run(
            evaluate,
            ["--checkpoint", ckpt, "--split", "test", "--predict-only", "--save-dir", str(out)],
        )
        == 0
    )
    assert sorted(p.stem for p in out.glob("*.png")) == ["img_b", "img_c"]
    assert run(evaluate, ["--checkpoint", ckpt, "--split", "test", "--predict-only"]) == 2
    assert "needs --mode seg and --save-dir" in capsys.readouterr().err
