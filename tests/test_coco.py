"""MS COCO 2014: class mapping, masks from instances JSON, prepare/resume/checksums, pre-converted
masks and their agreement check, datasets through the registry, and train/evaluate via the CLI."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.coco as coco
import datasets.parallel as parallel
import evaluate
import train
from datasets import DATASETS, build_eval_dataset, build_train_dataset
from datasets.coco import (
    COCOLayout,
    coco_layout,
    compare_preconverted,
    is_prepared,
    prepare_subset,
    prepared_dir,
    verify_masks,
)
from datasets.coco_annotations import (
    CATEGORY_TO_CLASS,
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    CocoImage,
    load_instances,
    rasterize,
)
from datasets.files import read_mask
from tests.fixtures import (
    EXPECTED_COCO_LABELS,
    coco_ann,
    coco_rect,
    expected_coco_masks,
    make_coco_tree,
    standard_coco_instances,
    write_coco_json,
)
from toco.cli import run_cli
from toco.errors import DataError

SUBSETS = ("train2014", "val2014")


def subset(stem: str) -> str:
    return "train2014" if "_train2014_" in stem else "val2014"


def onehot(classes: list[int]) -> np.ndarray:
    vector = np.zeros(80, dtype=np.float32)
    vector[[c - 1 for c in classes]] = 1
    return vector


@pytest.fixture(scope="module")
def prepared_tree(tmp_path_factory) -> tuple[Path, Path]:
    """The standard COCO tree, prepared once (read-only for the tests that use it)."""
    base = tmp_path_factory.mktemp("coco")
    root = make_coco_tree(base / "coco2014")
    cache = base / "cache"
    for name in SUBSETS:
        prepare_subset(root, prepared_dir(root, cache), name)
    return root, cache


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return make_coco_tree(tmp_path / "coco2014")


# --------------------------------------------------------------------------------------------
# Classes


def test_classes_are_toco_order_with_contiguous_ids():
    assert len(COCO_CLASSES) == 81 and DATASETS["coco"].num_classes == 81
    assert COCO_CLASSES[:6] == ("background", "person", "bicycle", "car", "motorcycle", "airplane")
    assert COCO_CLASSES[-1] == "toothbrush" and COCO_CLASSES[12] == "stop sign"
    assert len(COCO_CATEGORY_IDS) == 80 and sorted(COCO_CATEGORY_IDS) == list(COCO_CATEGORY_IDS)
    assert sorted(CATEGORY_TO_CLASS.values()) == list(range(1, 81))
    assert CATEGORY_TO_CLASS[1] == 1 and CATEGORY_TO_CLASS[13] == 12  # id 12 is unused
    assert CATEGORY_TO_CLASS[67] == 61 and COCO_CLASSES[61] == "dining table"
    assert CATEGORY_TO_CLASS[90] == 80
    assert DATASETS["coco"].train_split == "train" and DATASETS["coco"].val_split == "val_part"


# --------------------------------------------------------------------------------------------
# Masks and labels


def test_prepared_masks_are_exact(prepared_tree):
    root, cache = prepared_tree
    folder = prepared_dir(root, cache) / "SegmentationClass"
    for stem, expected in expected_coco_masks().items():
        path = folder / subset(stem) / f"{stem}.png"
        with Image.open(path) as img:
            assert img.mode == "P"  # VOC-style palette PNG, class id = pixel index
        np.testing.assert_array_equal(read_mask(path), expected, err_msg=stem)
    unlabelled = [
        folder / "train2014/COCO_train2014_000000000003.png",
        folder / "val2014/COCO_val2014_000000000074.png",
    ]
    assert not any(p.exists() for p in unlabelled)


def test_overlap_rule_smaller_instance_on_top_and_crowd_below_instances():
    mask = expected_coco_masks()["COCO_train2014_000000000001"]
    assert mask[10, 15] == 1  # person (400 px) over dog (600 px)
    assert mask[30, 25] == 17  # dog alone
    assert mask[20, 47] == 17  # dog over the crowd region
    assert mask[2, 50] == 255  # crowd only
    assert mask[2, 2] == 0
    # the rule itself, on an image built here: order of the annotations does not matter
    big = coco_ann(1, 7, 3, [coco_rect(0, 0, 10, 10)])  # car, 100 px
    small = coco_ann(2, 7, 1, [coco_rect(2, 2, 6, 6)])  # person, 16 px
    crowd = coco_ann(3, 7, 18, [coco_rect(0, 0, 12, 12)], crowd=1)
    for anns in ([big, small, crowd], [crowd, small, big]):
        out = rasterize(CocoImage(7, "x", 12, 12, tuple(anns)))
        assert out[3, 3] == 1 and out[0, 0] == 3 and out[11, 11] == 255


def test_equal_areas_lowest_annotation_id_wins():
    a = coco_ann(9, 1, 5, [coco_rect(0, 0, 4, 4)])
    b = coco_ann(4, 1, 9, [coco_rect(2, 0, 6, 4)])
    out = rasterize(CocoImage(1, "x", 4, 8, (a, b)))
    assert out[0, 3] == 9 and out[0, 1] == 5 and out[0, 5] == 9


def test_image_labels_and_split_lists(prepared_tree):
    root, cache = prepared_tree
    lists = prepared_dir(root, cache) / "ImageSets" / "Segmentation"
    assert (lists / "train.txt").read_text().split() == [
        "COCO_train2014_000000000001", "COCO_train2014_000000000002",
        "COCO_train2014_000000000004"]  # fmt: skip
    assert (lists / "val.txt").read_text().split() == [
        "COCO_val2014_000000000042", "COCO_val2014_000000000073"]  # fmt: skip
    assert (lists / "val_part.txt").read_text() == (lists / "val.txt").read_text()
    train_set = build_train_dataset("coco", root, "train", 32, cache)
    assert train_set.names == (lists / "train.txt").read_text().split()
    for name, vector in train_set.labels.items():
        np.testing.assert_array_equal(vector, onehot(EXPECTED_COCO_LABELS[name]))
    # crowd-only image 4 is labelled 'car'; image 2 keeps toothbrush (2-point polygon, no pixel)
    assert train_set.labels["COCO_train2014_000000000004"][2] == 1
    assert train_set.labels["COCO_train2014_000000000002"][79] == 1


def test_val_part_is_the_first_5000_of_the_sorted_val_list(tmp_path):
    names = [f"COCO_val2014_{i:012d}" for i in range(5003, 0, -1)]
    coco.write_split_lists(tmp_path, "val2014", sorted(names))
    part = (tmp_path / "ImageSets/Segmentation/val_part.txt").read_text().split()
    assert len(part) == 5000 and part == sorted(names)[:5000]


def test_grayscale_image_becomes_three_equal_channels(prepared_tree):
    root, cache = prepared_tree
    train_set = build_train_dataset("coco", root, "train", 32, cache, photometric=False)
    sample = train_set[train_set.names.index("COCO_train2014_000000000002")]
    assert sample["image"].shape == (3, 32, 32)
    layout = train_set.layout
    ev = build_eval_dataset("coco", root, "val", cache)
    assert isinstance(layout, COCOLayout) and layout.image_dir == root / "train2014"
    item = ev[0]
    assert item["image"].shape == (3, 36, 48) and item["mask"].dtype == torch.int64
    np.testing.assert_array_equal(item["mask"].numpy(), expected_coco_masks()[ev.names[0]])
    gray = coco_layout(root, "train", cache, prepare=False)
    from datasets.files import read_rgb

    pixels = np.asarray(read_rgb(gray.image_path("COCO_train2014_000000000002")))
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


# --------------------------------------------------------------------------------------------
# Prepare: resumable, checksummed, invalidated by a new annotation file


def test_prepare_resumes_after_a_kill_and_trusts_only_recorded_masks(
    coco_root, tmp_path, monkeypatch
):
    out = tmp_path / "prepared"
    monkeypatch.setattr(coco, "CHECKPOINT_EVERY", 1)
    real_render, calls = coco._render, []

    def dying_render(task):
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed while writing the second mask
        calls.append(task[0])
        return real_render(task)

    monkeypatch.setattr(coco, "_render", dying_render)
    with pytest.raises(KeyboardInterrupt):
        prepare_subset(coco_root, out, "train2014")
    manifest = json.loads((out / "manifest-train2014.json").read_text())
    assert manifest["complete"] is False and list(manifest["checksums"]) == calls
    assert not is_prepared(coco_root, out, "train2014")
    mask_dir = out / "SegmentationClass/train2014"
    # what a killed run may leave: a half-written mask it never recorded, and a temp file
    (mask_dir / "COCO_train2014_000000000002.png").write_bytes(b"\x89PNG half")
    (mask_dir / ".COCO_train2014_000000000004.png.x.tmp").write_bytes(b"junk")

    rendered = []
    monkeypatch.setattr(coco, "_render", lambda task: rendered.append(task[0])
                        or real_render(task))  # fmt: skip
    prepare_subset(coco_root, out, "train2014")
    assert rendered == ["COCO_train2014_000000000002", "COCO_train2014_000000000004"]
    assert is_prepared(coco_root, out, "train2014")
    assert sorted(p.name for p in mask_dir.iterdir()) == [
        f"COCO_train2014_00000000000{i}.png" for i in (1, 2, 4)
    ]
    for stem, expected in expected_coco_masks().items():
        if subset(stem) == "train2014":
            np.testing.assert_array_equal(read_mask(mask_dir / f"{stem}.png"), expected)


def test_masks_rendered_in_processes_are_the_same_files(coco_root, tmp_path, monkeypatch):
    plain = prepare_subset(coco_root, tmp_path / "plain", "train2014", workers=1)
    monkeypatch.setattr(coco, "MIN_MASKS_PER_WORKER", 1)  # a pool even for 3 masks
    pools = []
    fork = parallel.multiprocessing.get_context("fork")  # one object per start method
    real_pool = fork.Pool
    monkeypatch.setattr(fork, "Pool", lambda n: pools.append(n) or real_pool(n))
    pooled = prepare_subset(coco_root, tmp_path / "pooled", "train2014", workers=2)
    assert pools == [2] and pooled["checksums"] == plain["checksums"]
    assert plain["checksums"] and parallel.job() is None  # released after the run
    for stem in plain["checksums"]:
        a, b = (
            tmp_path / k / "SegmentationClass/train2014" / f"{stem}.png"
            for k in ("plain", "pooled")
        )
        assert a.read_bytes() == b.read_bytes()
    # a training start prepares with the machine's cores, but never more than 16 processes
    asked = []
    monkeypatch.setattr(coco, "ensure_prepared", lambda *a, workers: asked.append(workers))
    monkeypatch.setattr(coco, "available_cores", lambda: 3)
    coco_layout(coco_root, "train", None, tmp_path / "plain")
    assert asked == [3]
    monkeypatch.setattr(coco, "available_cores", lambda: 64)
    assert coco.preparing_workers() == 16
    monkeypatch.setattr(coco, "available_cores", lambda: 1)
    assert coco.preparing_workers() == 1


def test_checksum_manifest_detects_a_tampered_mask(coco_root, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare_subset(coco_root, out, "val2014")
    assert verify_masks(out, "val2014") == []
    mask = out / "SegmentationClass/val2014/COCO_val2014_000000000073.png"
    tampered = read_mask(mask)
    tampered[0, 0] = 9
    from datasets.files import save_palette_png

    save_palette_png(tampered, mask)
    (problem,) = verify_masks(out, "val2014")
    assert "COCO_val2014_000000000073.png does not match its checksum" in problem
    (out / "SegmentationClass/val2014/COCO_val2014_000000000042.png").unlink()
    assert any(
        "000042.png listed in" in p and "is missing" in p for p in verify_masks(out, "val2014")
    )
    rendered = []
    real_render = coco._render
    monkeypatch.setattr(coco, "_render", lambda task: rendered.append(task[0])
                        or real_render(task))  # fmt: skip
    prepare_subset(coco_root, out, "val2014")  # running prepare again repairs exactly those
    assert sorted(rendered) == ["COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    assert verify_masks(out, "val2014") == []


def test_new_annotation_file_invalidates_the_prepared_subset(coco_root, tmp_path):
    out = tmp_path / "prepared"
    prepare_subset(coco_root, out, "val2014")
    assert is_prepared(coco_root, out, "val2014")
    content = standard_coco_instances()["val2014"]
    content["annotations"].append(coco_ann(601, 74, 3, [coco_rect(0, 0, 8, 8)]))
    write_coco_json(coco_root, "val2014", content)
    assert not is_prepared(coco_root, out, "val2014")
    coco_layout(coco_root, "val", None, out)  # builds the layout, re-preparing on the way
    assert "COCO_val2014_000000000074" in (out / "ImageSets/Segmentation/val.txt").read_text()
    mask = read_mask(out / "SegmentationClass/val2014/COCO_val2014_000000000074.png")
    assert (mask[0:8, 0:8] == 3).all() and mask[8:, :].max() == 0


# --------------------------------------------------------------------------------------------
# Pre-converted masks (ToCo's layout)


def copy_masks_to_root(prepared: Path, root: Path) -> None:
    for name in SUBSETS:
        shutil.copytree(prepared / "SegmentationClass" / name, root / "SegmentationClass" / name)


def test_preconverted_masks_are_used_and_agree(prepared_tree, tmp_path):
    root, cache = prepared_tree
    mine = make_coco_tree(tmp_path / "coco2014")
    copy_masks_to_root(prepared_dir(root, cache), mine)
    layout = coco_layout(mine, "train", tmp_path / "cache")
    assert layout.mask_dir == mine / "SegmentationClass/train2014"
    manifest = json.loads((layout.prepared / "manifest-train2014.json").read_text())
    assert manifest["masks"] == "preconverted" and manifest["checksums"] == {}
    assert not (layout.prepared / "SegmentationClass").exists()  # nothing generated
    assert compare_preconverted(mine, "train2014") == (3, [])
    assert compare_preconverted(mine, "val2014") == (2, [])


def test_preconverted_masks_that_disagree_are_reported(prepared_tree, tmp_path):
    root, cache = prepared_tree
    mine = make_coco_tree(tmp_path / "coco2014")
    copy_masks_to_root(prepared_dir(root, cache), mine)
    raw = mine / "SegmentationClass/train2014/COCO_train2014_000000000001.png"
    mask = read_mask(raw)
    mask[mask == 17] = 18  # raw COCO category id of 'dog' instead of ToCo's contiguous 17
    from datasets.files import save_palette_png

    save_palette_png(mask, raw)
    wrong = mine / "SegmentationClass/val2014/COCO_val2014_000000000073.png"
    save_palette_png(np.zeros((32, 32), dtype=np.uint8), wrong)
    (mine / "SegmentationClass/val2014/COCO_val2014_000000000042.png").unlink()
    _, problems = compare_preconverted(mine, "train2014")
    assert len(problems) == 1 and "000001.png agrees with" in problems[0]
    assert "raw COCO category ids" in problems[0]
    _, problems = compare_preconverted(mine, "val2014")
    assert any("000073.png agrees with" in p and "50.0%" in p for p in problems)
    assert any("000042.png is missing" in p for p in problems)


def test_preconverted_tree_without_annotations(prepared_tree, tmp_path):
    root, cache = prepared_tree
    mine = make_coco_tree(tmp_path / "coco2014")
    copy_masks_to_root(prepared_dir(root, cache), mine)
    shutil.rmtree(mine / "annotations")
    ds = build_eval_dataset("coco", mine, "val", tmp_path / "cache")
    assert ds.names == ["COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    np.testing.assert_array_equal(ds.labels["COCO_val2014_000000000042"], onehot([5, 9]))


# --------------------------------------------------------------------------------------------
# Bad annotation files


def _break(content: dict, how: str) -> dict:
    if how == "unknown category":
        content["annotations"][0]["category_id"] = 12
    elif how == "renamed category":
        content["categories"][0]["name"] = "human"
    elif how == "unknown image":
        content["annotations"][0]["image_id"] = 999
    elif how == "duplicate image":
        content["images"].append(dict(content["images"][0]))
    elif how == "malformed polygon":
        content["annotations"][0]["segmentation"] = [[1, 2, 3]]
    elif how == "string coordinate":
        content["annotations"][0]["segmentation"][0][3] = "4"
    elif how == "boolean coordinate":
        content["annotations"][0]["segmentation"][0][2] = True
    elif how == "rle size":
        content["annotations"][1]["segmentation"]["size"] = [10, 10]
    elif how == "corrupt rle":  # among good shapes of the same image: the bad one is named
        content["annotations"][1]["segmentation"]["counts"] = "garbage!!"
    return content


@pytest.mark.parametrize("how, needle", [
    ("unknown category", "category id 12, not one of the 80"),
    ("unknown image", "refer to unknown image ids: 999"),
    ("duplicate image", "image id 1 is listed twice"),
    ("malformed polygon", "annotation 101 has a malformed polygon"),
    ("string coordinate", "annotation 101 has a malformed polygon"),
    ("boolean coordinate", "annotation 101 has a malformed polygon"),
    ("rle size", "annotation 102 has RLE size [10, 10]"),
    ("corrupt rle", "annotation 102 cannot be decoded"),
])  # fmt: skip
def test_bad_annotation_files_name_the_file(coco_root, tmp_path, how, needle):
    path = write_coco_json(
        coco_root, "train2014", _break(standard_coco_instances()["train2014"], how)
    )
    with pytest.raises(DataError) as err:
        prepare_subset(coco_root, tmp_path / "prepared", "train2014")
    assert str(path) in str(err.value) and needle in str(err.value)
    assert gc.isenabled()  # paused while parsing, on again after the error


def test_lenient_coco_format_variants(coco_root, tmp_path):
    """Other COCO-format writers: folders in file_name, string image ids, no image sizes, a
    renamed category (a warning: the category id decides the class)."""
    content = standard_coco_instances()["val2014"]
    for image in content["images"]:
        image["file_name"] = "val2014/" + image["file_name"]
        image["id"] = str(image["id"])
        del image["height"], image["width"]
    for ann in content["annotations"]:
        ann["image_id"] = str(ann["image_id"])
    content["categories"][2]["name"] = "aeroplane"  # id 5 is COCO's 'airplane'
    write_coco_json(coco_root, "val2014", content)
    out = tmp_path / "prepared"
    with pytest.warns(UserWarning, match="category id 5 is named 'aeroplane'.* 'airplane'"):
        prepare_subset(coco_root, out, "val2014")
    for stem in ("COCO_val2014_000000000042", "COCO_val2014_000000000073"):
        np.testing.assert_array_equal(read_mask(out / f"SegmentationClass/val2014/{stem}.png"),
                                      expected_coco_masks()[stem])  # fmt: skip


def test_missing_annotations_and_masks(coco_root, tmp_path):
    shutil.rmtree(coco_root / "annotations")
    with pytest.raises(DataError, match="neither .*instances_train2014.json nor pre-converted"):
        build_train_dataset("coco", coco_root, "train", 32, tmp_path / "cache")
    with pytest.raises(DataError, match="image folder .*val2014 not found"):
        shutil.rmtree(coco_root / "val2014")
        coco_layout(coco_root, "val", tmp_path / "cache")


def test_load_instances_counts(coco_root):
    index = load_instances(coco_root / "annotations/instances_train2014.json")
    assert len(index.images) == 4 and index.suffix == ".jpg"
    assert index.labelled() == ["COCO_train2014_000000000001", "COCO_train2014_000000000002",
                                "COCO_train2014_000000000004"]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Command line: train a few iterations on a COCO-format tree, then evaluate on full val

TINY = ["--backbone", "deit_tiny_patch16_224", "--backbone-depth", "2", "--aux-layer", "0",
        "--pretrained", "none", "--crop-size", "32", "--local-crop-size", "16",
        "--num-local-crops", "2", "--batch-size", "2", "--decoder-dim", "16",
        "--num-workers", "0", "--cam-scales", "1.0", "--val-scales", "1.0", "--par-iters", "2",
        "--par-dilations", "1", "2"]  # fmt: skip


def test_train_and_evaluate_coco_through_the_cli(coco_root, tmp_path):
    work, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--dataset", "coco", "--data-root", str(coco_root), "--cache-dir", str(cache),
            "--work-dir", str(work), "--train-split", "train", "--val-split", "val_part",
            "--max-iters", "2", "--seg-start-iter", "1", "--warmup-iters", "1",
            "--eval-every", "2", "--save-every", "2", "--log-every", "1", *TINY]  # fmt: skip
    assert run_cli(lambda: train.main(argv)) == 0
    assert (work / "COMPLETE").exists()
    assert "toothbrush" in (work / "val_iter000002.txt").read_text()
    out = tmp_path / "seg.json"
    code = run_cli(lambda: evaluate.main(["--checkpoint", str(work / "checkpoints/last.pt"),
                                          "--split", "val", "--dataset", "coco",
                                          "--output-json", str(out)]))  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["dataset"] == "coco" and report["num_images"] == 2 and len(report["iou"]) == 81
    assert report["iou"]["airplane"] is not None and report["iou"]["zebra"] is None


# --------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("recipe, backbone", [
    ("coco_vit_b", "vit_base_patch16_224.orig_in21k_ft_in1k"),
    ("coco_deit_b", "deit_base_patch16_224.fb_in1k"),
])  # fmt: skip
def test_coco_recipes_follow_the_official_schedule(recipe, backbone):
    from toco.build import build_loss_modules
    from toco.config import parse_config

    path = Path(__file__).parent.parent / "configs" / f"{recipe}.yaml"
    cfg, _ = parse_config(["--config", str(path), "--data-root", "/data/coco2014"])
    assert (cfg.dataset, cfg.backbone, cfg.train_split, cfg.val_split) == (
        "coco", backbone, "train", "val_part")  # fmt: skip
    assert (cfg.batch_size, cfg.max_iters, cfg.eval_every, cfg.aux_layer) == (8, 80000, 4000, -3)
    assert (cfg.high_thre, cfg.low_thre, cfg.bkg_thre, cfg.ctc_temp) == (0.65, 0.25, 0.45, 1.0)
    active = {
        n: {type(m).__name__ for m in build_loss_modules(cfg) if m.active(n)}
        for n in (0, 8000, 8001, 12000, 12001)
    }
    assert active[0] == active[8000] == {"ClassificationLoss"}  # only cls losses up to 8000
    seg_reg = {"ClassificationLoss", "SegmentationLoss", "RegularizationLoss"}
    assert active[8001] == active[12000] == seg_reg
    assert active[12001] == seg_reg | {"PatchTokenContrast", "ClassTokenContrast"}
    uses_aux = [n < cfg.aux_cam_until_iter for n in (12000, 12001)]  # the engine's rule
    assert uses_aux == [True, False]


def test_prepare_and_compare_commands(coco_root, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert run_cli(lambda: coco.main(["prepare", "--data-root", str(coco_root),
                                      "--out", str(out)])) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "train2014: 3 masks" in printed and "val2014: 2 masks" in printed
    assert run_cli(lambda: coco.main(["compare", "--data-root", str(coco_root)])) == 1
    assert "no pre-converted masks to compare" in capsys.readouterr().out
    copy_masks_to_root(out, coco_root)
    assert run_cli(lambda: coco.main(["compare", "--data-root", str(coco_root)])) == 0
    assert "train2014: 3/3 pre-converted masks agree" in capsys.readouterr().out
