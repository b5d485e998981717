"""--dataset tags: tagged collections in CSV, JSONL and COCO form, training on them through
train.py (with and without masks), the VOC equivalence, the mask-free scores, bad input."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

import datasets
import evaluate
import train
from datasets.tags import held_back, read_collection
from tests.fixtures import (
    STANDARD_LABELS,
    boxes_mask,
    coco_rect,
    make_standard_voc_tree,
    make_tags_tree,
    tags_form_of_voc,
    write_image,
)
from tests.test_cli import TINY, assert_user_error, run
from toco.errors import DataError
from toco.method.multilabel import average_precision, multilabel_scores

# bird = 1, cat = 2, dog = 3 (sorted names: no classes.txt)
IMAGES = {
    "cats/c1.jpg": (40, 48),
    "cats/c2.png": (36, 44),
    "dogs/d1.jpeg": (44, 40),
    "dogs/d2.webp": (40, 40),
    "mixed/m1.bmp": (48, 52),
    "mixed/m2.tif": (40, 46),
    "empty.jpg": (32, 32),
}
LABELS = {
    "cats/c1.jpg": ["cat"],
    "cats/c2.png": ["cat"],
    "dogs/d1.jpeg": ["dog"],
    "dogs/d2.webp": ["dog"],
    "mixed/m1.bmp": ["cat", "dog"],
    "mixed/m2.tif": ["bird", "cat"],
    "empty.jpg": [],
}
MASKS = {
    "dogs/d1.jpeg": boxes_mask(44, 40, [(3, 5, 30, 5, 30)]),
    "mixed/m1.bmp": boxes_mask(48, 52, [(2, 2, 20, 2, 20), (3, 25, 45, 25, 50)]),
}
EXPECTED = {
    "cats/c1": [2],
    "cats/c2": [2],
    "dogs/d1": [3],
    "dogs/d2": [3],
    "mixed/m1": [2, 3],
    "mixed/m2": [1, 2],
    "empty": [],
}


def labels_of(dataset) -> dict[str, list[int]]:
    """Class ids 1..K per id, from a dataset's multi-hot vectors."""
    return {n: (np.flatnonzero(v) + 1).tolist() for n, v in dataset.labels.items()}


def build(root: Path, split: str | None, cache: Path, train_set: bool = True, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty-label images left out of training
        if train_set:
            return datasets.build_train_dataset("tags", root, split, 32, cache, **kwargs)
        return datasets.build_eval_dataset("tags", root, split, cache, with_masks=None, **kwargs)


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tags_tree(tmp_path / "tags", IMAGES, LABELS, masks=MASKS)


# ---- reading the formats -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_labels_split_and_masks(tmp_path, fmt):
    root = make_tags_tree(tmp_path / fmt, IMAGES, LABELS, fmt=fmt, masks=MASKS)
    assert datasets.get_dataset_spec("tags", root).class_names == (
        "background",
        "bird",
        "cat",
        "dog",
    )
    train_set = build(root, None, tmp_path / "c")
    assert list((tmp_path / "c").glob("labels-train-*.json"))  # the label cache
    # default split: the images with masks are val; the rest train (the empty one left out)
    assert labels_of(train_set) == {
        k: v for k, v in EXPECTED.items() if k not in ("dogs/d1", "mixed/m1", "empty")
    }
    val_set = build(root, None, tmp_path / "c", train_set=False)
    assert val_set.with_masks and val_set.names == ["dogs/d1", "mixed/m1"]
    assert labels_of(val_set) == {"dogs/d1": [3], "mixed/m1": [2, 3]}
    np.testing.assert_array_equal(val_set[1]["mask"].numpy(), MASKS["mixed/m1.bmp"])
    sample = train_set[0]
    assert sample["image"].shape == (3, 32, 32) and sample["cls_label"].shape == (3,)


def test_classes_txt_sets_the_order(tmp_path):
    root = make_tags_tree(tmp_path / "t", IMAGES, LABELS, classes=["dog", "cat", "bird", "fox"])
    assert datasets.get_dataset_spec("tags", root).num_classes == 5
    train_set = build(root, "train", tmp_path / "c", synthetic_params={"val_fraction": 0.0})
    assert labels_of(train_set)["mixed/m2"] == [2, 3]  # cat = 2, bird = 3
    assert labels_of(train_set)["dogs/d1"] == [1]


def test_without_masks_a_fixed_fraction_is_held_back(tmp_path):
    root = make_tags_tree(tmp_path / "t", IMAGES, LABELS)
    ids = sorted(read_collection(root).files)
    val = build(
        root, "val", tmp_path / "c", train_set=False, synthetic_params={"val_fraction": 0.3}
    )
    assert not val.with_masks and len(val) == round(0.3 * len(ids))
    assert val.names == held_back(ids, 0.3) == held_back(reversed(ids), 0.3)
    train_set = build(root, "train", tmp_path / "c", synthetic_params={"val_fraction": 0.3})
    assert not set(train_set.names) & set(val.names)
    assert set(train_set.names) | set(val.names) | {"empty"} == set(ids)  # untagged: not trained
    # cls_label of a held-back image: its tags
    assert labels_of(val) == {n: EXPECTED[n] for n in val.names}
    with pytest.raises(DataError, match="no image is held back"):
        build(root, "val", tmp_path / "c", train_set=False, synthetic_params={"val_fraction": 0.0})


def test_split_files_list_image_paths(tmp_path):
    root = make_tags_tree(
        tmp_path / "t",
        IMAGES,
        LABELS,
        masks=MASKS,
        splits={"train": ["cats/c1.jpg", "dogs/d1"], "mine": ["mixed/m1.bmp", "dogs/d1.jpeg"]},
    )
    assert build(root, "train", tmp_path / "c").names == ["cats/c1", "dogs/d1"]
    mine = build(root, "mine", tmp_path / "c", train_set=False)
    assert mine.with_masks and mine.names == ["mixed/m1", "dogs/d1"]


def test_a_split_with_masks_for_some_images_only_is_refused(tmp_path):
    root = make_tags_tree(
        tmp_path / "t", IMAGES, LABELS, masks=MASKS, splits={"val": ["dogs/d1.jpeg", "cats/c1.jpg"]}
    )
    with pytest.raises(DataError, match=r"1 of 2 images have no mask.*cats/c1"):
        build(root, "val", tmp_path / "c", train_set=False)


def coco_tree(root: Path, with_segmentation: bool = True) -> Path:
    """images a.jpg (widget + gadget, segmented), sub/b.png (gadget tag), d.jpg (widget tag),
    c.jpg (no annotation); categories with their own ids: gadget 3 -> 1, widget 7 -> 2."""
    sizes = {"a.jpg": (30, 40), "sub/b.png": (32, 32), "c.jpg": (30, 30), "d.jpg": (34, 30)}
    for name, hw in sizes.items():
        write_image(root / "images" / name, hw)
    images = [
        {"id": i + 1, "file_name": name, "height": hw[0], "width": hw[1]}
        for i, (name, hw) in enumerate(sizes.items())
    ]
    seg = (lambda *box: [coco_rect(*box)]) if with_segmentation else (lambda *box: [])
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": seg(0, 0, 40, 20)},
        {"id": 2, "image_id": 1, "category_id": 3, "segmentation": seg(5, 5, 15, 12)},
        {"id": 3, "image_id": 2, "category_id": 3},
        {"id": 4, "image_id": 4, "category_id": 7, "segmentation": []},
    ]
    categories = [{"id": 7, "name": "widget"}, {"id": 3, "name": "gadget"}]
    (root / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def test_coco_form_with_own_categories(tmp_path):
    root = coco_tree(tmp_path / "coco")
    assert datasets.get_dataset_spec("tags", root).class_names == ("background", "gadget", "widget")
    train_set = build(root, None, tmp_path / "c")
    assert labels_of(train_set) == {"d": [2], "sub/b": [1]}  # c has no tag: left out
    val_set = build(root, None, tmp_path / "c", train_set=False)
    assert val_set.names == ["a"] and labels_of(val_set) == {"a": [1, 2]}
    expected = np.zeros((30, 40), np.uint8)
    expected[0:20, 0:40] = 2
    expected[5:12, 5:15] = 1  # the smaller instance on top
    np.testing.assert_array_equal(val_set[0]["mask"].numpy(), expected)


def test_coco_form_without_segmentations_has_no_masks(tmp_path):
    root = coco_tree(tmp_path / "coco", with_segmentation=False)
    val_set = build(
        root, "val", tmp_path / "c", train_set=False, synthetic_params={"val_fraction": 0.25}
    )
    assert not val_set.with_masks and len(val_set) == 1


def test_csv_form_of_a_voc_tree_matches_the_voc_form(tmp_path):
    voc = make_standard_voc_tree(tmp_path / "voc")
    tags = tags_form_of_voc(voc, tmp_path / "tags", STANDARD_LABELS)
    for split in ("train", "val"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = datasets.build_train_dataset("voc", voc, split, 32, None)
            b = datasets.build_train_dataset("tags", tags, split, 32, None)
        assert a.names == b.names
        assert labels_of(a) == labels_of(b)
    a = datasets.build_eval_dataset("voc", voc, "val", None)
    b = datasets.build_eval_dataset("tags", tags, "val", None, with_masks=None)
    assert b.with_masks and a.names == b.names and labels_of(a) == labels_of(b)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["mask"].numpy(), b[i]["mask"].numpy())
        np.testing.assert_array_equal(a[i]["image"].numpy(), b[i]["image"].numpy())


# ---- bad input: one line naming the file and the line ------------------------------------


def rewrite_csv(root: Path, *lines: str) -> None:
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"{x}\n" for x in lines))


@pytest.mark.parametrize(
    "lines,classes,needle",
    [
        (
            ["cats/c1.jpg,cat", "dogs/d1.jpeg,fox"],
            ["cat", "dog"],
            "labels.csv line 3: unknown class 'fox'",
        ),
        (
            ["cats/c1.jpg,cat", "dogs/d1.jpeg,dog", "cats/c1.jpg,dog"],
            None,
            "labels.csv line 4: image cats/c1.jpg is listed again (first on line 2)",
        ),
        (["cats/c1.jpg,cat", "cats/nope.jpg,cat"], None, "labels.csv line 3: image"),
        (["cats/c1.jpg,cat,dog"], None, "labels.csv line 2: expected 2 fields"),
    ],
)
def test_bad_label_lines(tmp_path, capsys, lines, classes, needle):
    root = make_tags_tree(tmp_path / "t", IMAGES, LABELS, classes=classes)
    rewrite_csv(root, *lines)
    code = run(train, tags_args(root, tmp_path / "run", "--max-iters", "1"))
    assert_user_error(capsys, code, needle)
    assert not (tmp_path / "run").exists()


def test_bad_jsonl_line_and_header(tmp_path):
    root = make_tags_tree(tmp_path / "t", IMAGES, LABELS, fmt="jsonl")
    with open(root / "labels.jsonl", "a") as fh:
        fh.write('{"image": "cats/c1.jpg", "labels": "cat"}\n')
    with pytest.raises(DataError, match=r"labels.jsonl line 8: expected"):
        read_collection(root)
    other = make_tags_tree(tmp_path / "u", IMAGES, LABELS)
    (other / "labels.csv").write_text("file,tags\ncats/c1.jpg,cat\n")
    with pytest.raises(DataError, match=r"labels.csv line 1: expected the header"):
        read_collection(other)
    (other / "labels.jsonl").write_text("")
    with pytest.raises(DataError, match="keep one labels file"):
        read_collection(other)


def test_bad_split_file_line(tmp_path):
    root = make_tags_tree(
        tmp_path / "t", IMAGES, LABELS, splits={"train": ["cats/c1.jpg", "cats/c9.jpg"]}
    )
    with pytest.raises(DataError, match=r"train.txt line 2: 'cats/c9.jpg' is not an image"):
        build(root, "train", tmp_path / "c")


@pytest.mark.parametrize(
    "mask,needle",
    [
        (boxes_mask(44, 40, [(4, 5, 30, 5, 30)]), "holds values [4] outside 0..3"),
        (boxes_mask(40, 40, [(3, 5, 30, 5, 30)]), "is 40x40 but image"),
    ],
)
def test_bad_masks_name_the_mask(tmp_path, capsys, mask, needle):
    root = make_tags_tree(tmp_path / "t", IMAGES, LABELS, masks={**MASKS, "dogs/d1.jpeg": mask})
    code = run(train, tags_args(root, tmp_path / "run", "--max-iters", "1"))
    assert_user_error(capsys, code, needle, "masks/dogs/d1.png")


def test_check_command(tree, tmp_path, capsys):
    from datasets import check

    assert (
        check.main(
            ["--dataset", "tags", "--data-root", str(tree), "--cache-dir", str(tmp_path / "c")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "tags at" in out and "(4 classes)" in out and "7 image(s) checked; OK" in out
    assert "note:" not in out
    write_image(tree / "images" / "extra.jpg", (20, 20))
    assert (
        check.main(
            ["--dataset", "tags", "--data-root", str(tree), "--cache-dir", str(tmp_path / "c")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("1 image(s) in") == 1  # once, not per split
    assert "not in labels.csv and are left out: extra.jpg" in out
    from tests.fixtures import write_mask_png

    write_mask_png(tree / "masks" / "dogs" / "d1.png", boxes_mask(44, 40, [(9, 5, 30, 5, 30)]))
    assert (
        check.main(
            ["--dataset", "tags", "--data-root", str(tree), "--cache-dir", str(tmp_path / "c")]
        )
        == 1
    )
    assert "holds values [9]" in capsys.readouterr().out


# ---- training through train.py ------------------------------------------------------------


def tags_args(root: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        "tags",
        "--data-root",
        str(root),
        "--cache-dir",
        str(work.parent / "cache"),
        "--work-dir",
        str(work),
        *TINY,
        "--warmup-iters",
        "1",
        "--log-every",
        "1",
        "--seg-start-iter",
        "1",
        *extra,
    ]


def test_training_with_masks_reports_miou_and_loads_for_evaluation(tree, tmp_path):
    work = tmp_path / "run"
    assert run(train, tags_args(tree, work, "--max-iters", "2", "--eval-every", "2")) == 0
    table = (work / "val_iter000002.txt").read_text()
    assert "mIoU" in table and "dog" in table and "bird" in table
    final = json.loads((work / "final.json").read_text())
    assert math.isfinite(final["seg_miou"])
    out = tmp_path / "eval.json"
    assert (
        run(
            evaluate,
            ["--checkpoint", str(work / "checkpoints" / "last.pt"), "--output-json", str(out)],
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["num_images"] == 2 and set(report["iou"]) == {"background", "bird", "cat", "dog"}
    # the checkpoint names its classes, so a release can be written without the data root
    from safetensors import safe_open

    from toco.checkpoint import load_checkpoint
    from toco.export import export_release

    ckpt = work / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["class_names"] == ["background", "bird", "cat", "dog"]
    tree.rename(tree.with_name("moved"))
    release = export_release(str(ckpt), str(tmp_path / "model.safetensors"))
    with safe_open(str(release), framework="pt") as fh:
        assert json.loads(fh.metadata()["class_names"]) == ["background", "bird", "cat", "dog"]
    from toco import load_segmenter

    segmenter = load_segmenter(str(ckpt), device="cpu")
    assert segmenter.class_names == ("background", "bird", "cat", "dog")
    prediction = segmenter.predict(np.zeros((20, 30, 3), np.uint8))
    assert prediction.mask.shape == (20, 30) and prediction.mask.max() <= 3


@pytest.mark.parametrize("form", ["csv", "jsonl", "coco"])
def test_training_without_masks_scores_the_held_back_images(tmp_path, form):
    if form == "coco":
        root = coco_tree(tmp_path / "coco", with_segmentation=False)
        fraction = "0.25"
    else:
        root = make_tags_tree(tmp_path / form, IMAGES, LABELS, fmt=form)
        fraction = "0.3"
    work = tmp_path / "run"
    assert (
        run(
            train,
            tags_args(
                root,
                work,
                "--max-iters",
                "2",
                "--eval-every",
                "1",
                "--val-fraction",
                fraction,
                "--preview-images",
                "2",
            ),
        )
        == 0
    )
    for done in (1, 2):
        text = (work / f"val_iter{done:06d}.txt").read_text()
        assert "classification mAP" in text and "pseudo-label coverage" in text
    from PIL import Image

    with Image.open(work / "preview.png") as picture:  # the held-back images, no ground truth
        assert picture.format == "PNG" and picture.width > 5 * 128
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in records if "val/cls_map" in r]
    assert [r["iter"] for r in scores] == [1, 2]
    assert all(0 <= r["val/pseudo_coverage"] <= 100 for r in scores)
    final = json.loads((work / "final.json").read_text())
    assert final["validation"]["image_level"]["images"] == scores[-1]["val/images"]


def test_eval_every_0_turns_validation_off(tmp_path):
    root = make_tags_tree(tmp_path / "t", IMAGES, LABELS)
    work = tmp_path / "run"
    assert (
        run(
            train,
            tags_args(root, work, "--max-iters", "2", "--eval-every", "0", "--val-fraction", "0"),
        )
        == 0
    )
    assert not list(work.glob("val_iter*"))
    assert json.loads((work / "final.json").read_text())["validation"] == {}


# ---- the mask-free scores against hand-computed values -------------------------------------


def test_average_precision_by_hand():
    # ranks 1..4: positive, negative, positive, negative: precision 1/1 and 2/3 at the hits
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # tied 0.5s enter together: thresholds 0.9 (no hit), 0.5 (1 of 3), 0.1 (2 of 4)
    assert average_precision([0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1]) == pytest.approx(
        0.5 * 1 / 3 + 0.5 * 2 / 4
    )
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))


def test_multilabel_scores_by_hand():
    scores = np.array([[0.9, 0.2, 0.1], [0.6, 0.7, 0.1], [0.4, 0.8, 0.3], [0.1, 0.3, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    out = multilabel_scores(scores, targets)
    # class 1: ranks 0.9(+) 0.6(-) 0.4(+) 0.1: AP (1 + 2/3)/2; class 2: 0.8(+) 0.7(+): AP 1;
    # class 3 has no positive: left out of the mean
    assert out["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2 * 100)
    # at 0.5: class 1 TP 1 FP 1 FN 1 -> F1 1/2; class 2 TP 2 -> 1; class 3 counts nothing
    assert out["f1"] == pytest.approx((0.5 + 1.0) / 2 * 100)
    assert out["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1) * 100)


def test_a_mask_class_the_tags_do_not_list_is_refused(tmp_path):
    labels = {**LABELS, "dogs/d1.jpeg": ["cat"]}  # its mask holds dog (3)
    root = make_tags_tree(tmp_path / "t", IMAGES, labels, masks=MASKS)
    with pytest.raises(DataError, match=r"masks/dogs/d1.png holds class\(es\) \[3\]"):
        build(root, "val", tmp_path / "c", train_set=False)


def test_bad_classes_txt_and_val_fraction(tmp_path, capsys):
    root = make_tags_tree(tmp_path / "t", IMAGES, LABELS, classes=["cat", "dog", "cat"])
    with pytest.raises(DataError, match=r"classes.txt line 3: class 'cat' is listed twice"):
        read_collection(root)
    code = run(train, tags_args(root, tmp_path / "run", "--val-fraction", "1.5"))
    assert_user_error(capsys, code, "val_fraction must be in [0, 1)")


def test_validation_without_masks_by_hand(monkeypatch):
    """Two images, K = 2: the logits and pseudo labels are given, the scores counted by hand."""
    import torch

    from toco.config import TrainConfig
    from toco.evaluation import unmasked as unmasked_validation

    labels = [
        torch.tensor([[[1, 1, 255, 0], [255, 0, 1, 0]]]),  # 3 fg, 2 uncertain, 3 bg
        torch.tensor([[[2, 255, 255, 255], [255, 255, 0, 0]]]),
    ]  # 1 fg, 5 uncertain
    logits = [torch.tensor([[2.0, 1.0]]), torch.tensor([[-1.0, 3.0]])]
    calls = iter(range(2))

    class Stub(torch.nn.Module):
        def encode(self, x):
            return x

        def classify(self, feats):
            self.index = next(calls)
            return logits[self.index], None

    model = Stub()
    monkeypatch.setattr(
        unmasked_validation,
        "pseudo_labels",
        lambda m, image, cls_label, *a, **k: labels[model.index],
    )
    loader = [
        {
            "name": [f"i{i}"],
            "image": torch.zeros(1, 3, 2, 4, dtype=torch.uint8),
            "cls_label": torch.tensor([tags]),
        }
        for i, tags in enumerate([[1.0, 0.0], [0.0, 1.0]])
    ]
    metrics = unmasked_validation.validate_without_masks(
        model, loader, TrainConfig(), torch.device("cpu"), size=4
    )
    assert metrics["pseudo_coverage"] == pytest.approx((6 + 3) / 16 * 100)
    assert metrics["pseudo_foreground"] == pytest.approx((3 + 1) / 16 * 100)
    # sigmoids: image 0 (0.88, 0.73) tags (1, 0); image 1 (0.27, 0.95) tags (0, 1)
    assert metrics["cls_map"] == pytest.approx(100.0)
    assert metrics["cls_f1"] == pytest.approx((1.0 + 2 / 3) / 2 * 100)  # class 2: FP on image 0
    assert metrics["cls_f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 1) * 100)
    assert metrics["images"] == 2


def test_images_are_read_as_predict_reads_them(tmp_path):
    """EXIF orientation applied (the mask is at the displayed size), 16-bit scaled to 8 bit."""
    from PIL import Image

    from toco.images import read_image

    root = make_tags_tree(
        tmp_path / "t",
        {"a.jpg": (30, 30)},
        {"a.jpg": ["cat"], "turned.jpg": ["cat"], "deep.png": ["dog"]},
    )
    stored = Image.fromarray(
        np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (24, 1, 3))
    )  # 40 wide, 24 high
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 24 wide, 40 high
    stored.save(root / "images" / "turned.jpg", exif=exif, quality=95)
    deep = np.arange(20 * 16, dtype=np.uint16).reshape(20, 16) * 200
    Image.fromarray(deep).save(root / "images" / "deep.png")
    (root / "masks").mkdir()
    from tests.fixtures import write_mask_png

    write_mask_png(root / "masks" / "turned.png", boxes_mask(40, 24, [(1, 5, 20, 5, 20)]))
    write_mask_png(root / "masks" / "deep.png", boxes_mask(20, 16, [(2, 2, 10, 2, 10)]))
    val = build(root, "val", tmp_path / "c", train_set=False)
    assert val.names == ["deep", "turned"] and val.with_masks
    for i, name in enumerate(val.names):
        image = val[i]["image"].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(
            image, read_image(root / "images" / read_collection(root).files[name])
        )
    assert val[1]["image"].shape == (3, 40, 24)
    assert val[0]["image"].max() == round(deep.max() / 65535 * 255)  # scaled, not clipped


def test_two_processes_score_every_held_back_image_once(tmp_path):
    """torchrun on CPU: each rank scores its shard; the scores cover all held-back images."""
    import subprocess

    from tests.test_runtime import REPO, _env, _python

    root = make_tags_tree(tmp_path / "t", IMAGES, LABELS)
    work = tmp_path / "ddp"
    cmd = _python(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "train.py"),
        *tags_args(
            root,
            work,
            "--max-iters",
            "1",
            "--eval-every",
            "1",
            "--val-fraction",
            "0.4",
            "--threads",
            "1",
        ),
    )
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    held = held_back(read_collection(root).files, 0.4)
    assert len(held) == 3  # shards of 2 and 1 images
    final = json.loads((work / "final.json").read_text())
    assert final["validation"]["image_level"]["images"] == 3
    assert res.stdout.count("validation at iteration 1") == 1
