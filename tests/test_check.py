"""Data checks: ``python -m datasets.check`` on VOC, COCO and synthetic trees (every bad input is
named), and bad images met during training (stop naming the file, or skip with a warning)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import train
from datasets import check
from datasets.coco import prepare_subset, prepared_dir
from datasets.files import read_mask, save_palette_png
from datasets.synthetic import make_synthetic_voc
from tests.fixtures import (
    ImageSpec,
    boxes_mask,
    make_coco_tree,
    make_voc_tree,
    standard_coco_instances,
    write_coco_json,
    write_mask_png,
    write_voc_xml,
)
from toco.cli import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:.*no foreground class:UserWarning")


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """A clean VOC tree: train a, b, c; val d; test t1, t2 (no masks, XML annotations)."""
    specs = [
        ImageSpec("a", boxes_mask(32, 40, [(1, 2, 12, 2, 12)])),
        ImageSpec("b", boxes_mask(36, 30, [(15, 4, 20, 4, 20), (7, 22, 30, 5, 25)])),
        ImageSpec("c", boxes_mask(30, 30, [(20, 0, 10, 0, 30)]), mode="L"),
        ImageSpec("d", boxes_mask(28, 28, [(3, 5, 15, 5, 15)])),
        ImageSpec("t1", None, image_hw=(30, 40)),
        ImageSpec("t2", None, image_hw=(20, 20)),
    ]
    root = make_voc_tree(
        tmp_path / "VOC2012",
        specs,
        {"train_aug": ["a", "b", "c"], "val": ["d"], "test": ["t1", "t2"]},
    )
    write_voc_xml(root / "Annotations/t1.xml", (30, 40), ["person", "dog"])
    write_voc_xml(root / "Annotations/t2.xml", (20, 20), ["boat"], difficult=[True])
    return root


def run_check(capsys, *argv: str) -> tuple[int, str]:
    code = run_cli(lambda: check.main(list(argv)))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_clean_voc_tree_passes(voc, capsys):
    code, out = run_check(capsys, "--dataset", "voc", "--data-root", str(voc))
    assert code == 0, out
    assert "train_aug: 3 ids from" in out and "val: 1 ids" in out
    assert out.strip().endswith("4 image(s) checked; OK")


def test_test_split_needs_no_masks_and_reads_xml(voc, capsys):
    code, out = run_check(capsys, "--dataset", "voc", "--data-root", str(voc), "--splits", "test")
    assert code == 0, out
    (voc / "Annotations/t2.xml").write_text("<annotation><object><name>boat")
    code, out = run_check(capsys, "--dataset", "voc", "--data-root", str(voc), "--splits", "test")
    assert code == 1 and "[bad-annotation] cannot read annotation" in out and "t2.xml" in out


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-120])


BREAKS = {
    "missing-image": (lambda r: (r / "JPEGImages/b.jpg").unlink(),
                      "image {r}/JPEGImages/b.jpg does not exist"),
    "corrupt-image": (lambda r: truncate(r / "JPEGImages/c.jpg"),
                      "[bad-image] cannot read image {r}/JPEGImages/c.jpg"),
    "garbage-image": (lambda r: (r / "JPEGImages/a.jpg").write_bytes(b"not a jpeg" * 20),
                      "[bad-image] cannot read image {r}/JPEGImages/a.jpg"),
    "missing-mask": (lambda r: (r / "SegmentationClass/b.png").unlink(),
                     "[missing-mask] mask {r}/SegmentationClass/b.png of image"),
    "size-mismatch": (lambda r: write_mask_png(r / "SegmentationClass/a.png",
                                               boxes_mask(31, 40, [(1, 2, 9, 2, 9)])),
                      "[bad-mask] mask {r}/SegmentationClass/a.png is 40x31 but image"),
    "bad-values": (lambda r: write_mask_png(r / "SegmentationClass/d.png",
                                            boxes_mask(28, 28, [(21, 5, 15, 5, 15)])),
                   "[bad-mask] mask {r}/SegmentationClass/d.png holds values [21] outside 0..20"),
    "rgb-mask": (lambda r: write_mask_png(r / "SegmentationClass/b.png",
                                          boxes_mask(36, 30, [(1, 4, 9, 4, 9)]), "RGB"),
                 "[bad-mask] mask {r}/SegmentationClass/b.png has mode RGB"),
    "empty-labels": (lambda r: write_mask_png(r / "SegmentationClass/c.png",
                                              boxes_mask(30, 30, [])),
                     "[empty-labels] image {r}/JPEGImages/c.jpg has no foreground class"),
    "duplicate-ids": (lambda r: (r / "ImageSets/Segmentation/train_aug.txt")
                      .write_text("a\nb\na\n"),
                      "[duplicate-ids] split file {r}/ImageSets/Segmentation/train_aug.txt "
                      "repeats 1 id(s): a"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_each_bad_input_is_reported_naming_the_file(voc, capsys, kind):
    damage, expected = BREAKS[kind]
    damage(voc)
    code, out = run_check(capsys, "--dataset", "voc", "--data-root", str(voc))
    assert code == 1, out
    assert expected.format(r=voc) in out, out
    assert "FAILED: 1 problem(s)" in out


def test_missing_split_file_and_shipped_list_fallback(voc, capsys):
    code, out = run_check(capsys, "--dataset", "voc", "--data-root", str(voc), "--splits",
                          "trainval")  # fmt: skip
    assert code == 1
    assert f"[split] split file {voc}/ImageSets/Segmentation/trainval.txt not found" in out
    (voc / "ImageSets/Segmentation/val.txt").unlink()  # now the shipped VOC list is used
    code, out = run_check(capsys, "--dataset", "voc", "--data-root", str(voc), "--splits", "val")
    assert code == 1 and "val: 1449 ids from" in out and "splits/voc/val.txt" in out
    assert f"[missing-image] image {voc}/JPEGImages/2007_000033.jpg does not exist" in out
    assert "missing-image 1449" in out


def test_quick_mode_reads_headers_only(voc, capsys):
    truncate(voc / "JPEGImages/c.jpg")  # header intact: only a full decode finds it
    code, out = run_check(capsys, "--dataset", "voc", "--data-root", str(voc), "--quick")
    assert code == 0 and "headers only" in out


def test_many_problems_are_summarised(voc, capsys):
    for name in "abc":
        (voc / f"SegmentationClass/{name}.png").unlink()
    code, out = run_check(capsys, "--dataset", "voc", "--data-root", str(voc), "--show", "1")
    assert code == 1 and out.count("[missing-mask]") == 2  # one shown + the summary line
    assert "... and 2 more [missing-mask] problem(s)" in out and "missing-mask 3" in out


def test_bad_arguments_exit_2(capsys, tmp_path):
    code, out = run_check(capsys, "--dataset", "imagenet")
    assert code == 2 and "invalid choice" in out
    code, out = run_check(capsys, "--dataset", "voc", "--data-root", str(tmp_path / "none"))
    assert code == 1 and "[layout] dataset root" in out


def test_synthetic_tree(tmp_path, capsys):
    root = make_synthetic_voc(tmp_path / "syn", num_train=3, num_val=2, image_size=(48, 48))
    code, out = run_check(capsys, "--dataset", "synthetic", "--data-root", str(root))
    assert code == 0 and "5 image(s) checked; OK" in out, out


# --------------------------------------------------------------------------------------------
# COCO


def test_coco_prepared_tree_and_tampered_mask(tmp_path, capsys):
    root, cache = make_coco_tree(tmp_path / "coco"), tmp_path / "cache"
    args = (
        "--dataset",
        "coco",
        "--data-root",
        str(root),
        "--cache-dir",
        str(cache),
        "--splits",
        "train",
        "val",
    )
    code, out = run_check(capsys, *args)
    assert code == 0 and "not prepared yet" in out and "5 image(s) checked; OK" in out, out
    for subset in ("train2014", "val2014"):
        prepare_subset(root, prepared_dir(root, cache), subset)
    code, out = run_check(capsys, *args)
    assert code == 0 and "not prepared" not in out, out
    mask = prepared_dir(root, cache) / "SegmentationClass/val2014/COCO_val2014_000000000073.png"
    pixels = read_mask(mask)
    pixels[0, 0] = 40
    save_palette_png(pixels, mask)
    code, out = run_check(capsys, *args)
    assert code == 1, out
    assert f"[checksum] mask {mask} does not match its checksum" in out
    assert f"[label-mismatch] mask {mask} holds class(es) [40]" in out


def test_coco_unprepared_corrupt_image_and_bad_json(tmp_path, capsys):
    root, cache = make_coco_tree(tmp_path / "coco"), tmp_path / "cache"
    truncate(root / "train2014/COCO_train2014_000000000002.jpg")
    args = ("--dataset", "coco", "--data-root", str(root), "--cache-dir", str(cache))
    code, out = run_check(capsys, *args, "--splits", "train")
    assert code == 1 and "[bad-image] cannot read image" in out
    assert "COCO_train2014_000000000002.jpg" in out
    content = standard_coco_instances()["val2014"]
    content["annotations"][0]["category_id"] = 91
    path = write_coco_json(root, "val2014", content)
    code, out = run_check(capsys, *args, "--splits", "val_part")
    assert code == 1 and f"[annotations] annotation file {path}: annotation 401" in out


def test_coco_preconverted_disagreement(tmp_path, capsys):
    root, cache = make_coco_tree(tmp_path / "coco"), tmp_path / "cache"
    prepare_subset(root, prepared_dir(root, cache), "val2014")
    shutil.copytree(
        prepared_dir(root, cache) / "SegmentationClass/val2014", root / "SegmentationClass/val2014"
    )
    bad = root / "SegmentationClass/val2014/COCO_val2014_000000000042.png"
    save_palette_png(np.zeros((36, 48), dtype=np.uint8), bad)
    code, out = run_check(
        capsys,
        "--dataset",
        "coco",
        "--data-root",
        str(root),
        "--cache-dir",
        str(tmp_path / "other-cache"),
        "--splits",
        "val",
    )
    assert code == 1, out
    assert f"[disagreement] pre-converted mask {bad} agrees with" in out
    assert "1/2 sampled agree" in out


# --------------------------------------------------------------------------------------------
# Bad images met while training

TINY = ["--backbone", "deit_tiny_patch16_224", "--backbone-depth", "1", "--aux-layer", "0",
        "--pretrained", "none", "--crop-size", "32", "--local-crop-size", "16",
        "--num-local-crops", "1", "--batch-size", "2", "--decoder-dim", "8",
        "--num-workers", "0", "--cam-scales", "1.0", "--val-scales", "1.0", "--par-iters", "1",
        "--par-dilations", "1", "--max-iters", "2", "--eval-every", "2", "--log-every", "1",
        "--warmup-iters", "1"]  # fmt: skip


def test_training_skips_a_corrupt_image_with_the_flag(voc, tmp_path, capsys):
    truncate(voc / "JPEGImages/b.jpg")
    (voc / "ImageSets/Segmentation/two.txt").write_text("a\nb\n")  # every batch holds b
    base = [
        "--dataset",
        "voc",
        "--data-root",
        str(voc),
        "--train-split",
        "two",
        "--val-split",
        "val",
        "--cache-dir",
        str(tmp_path / "cache"),
        *TINY,
    ]
    code = run_cli(lambda: train.main(base + ["--work-dir", str(tmp_path / "stop")]))
    err = capsys.readouterr().err
    assert code == 2 and "cannot read image" in err and "b.jpg" in err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = run_cli(
            lambda: train.main(base + ["--work-dir", str(tmp_path / "skip"), "--skip-bad-images"])
        )
    assert code == 0 and (tmp_path / "skip/COMPLETE").exists()
    skipped = [w for w in caught if "skipping a training image" in str(w.message)]
    assert len(skipped) == 1 and "b.jpg" in str(skipped[0].message)
