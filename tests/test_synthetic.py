"""The synthetic VOC-layout dataset: determinism, idempotence, mask format, content biases."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.synthetic as synthetic
from datasets import DATASETS, build_eval_dataset, build_train_dataset
from datasets.synthetic import (
    BOAT,
    GENERATOR_VERSION,
    SYNTHETIC_CLASSES,
    ensure_synthetic,
    make_synthetic_voc,
)
from datasets.voc import VOCLayout, image_labels
from toco.errors import ConfigError, DataError

SMALL = dict(num_train=6, num_val=2, image_size=(64, 80))


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> tuple[Path, float]:
    """The full default dataset (600 + 120 images at 160 px), generated once, with its time."""
    root = tmp_path_factory.mktemp("synthetic") / "default"
    start = time.perf_counter()
    make_synthetic_voc(root)
    return root, time.perf_counter() - start


@pytest.fixture(scope="module")
def masks(default_set) -> dict[str, np.ndarray]:
    root, _ = default_set
    return {p.stem: np.asarray(Image.open(p)) for p in (root / "SegmentationClass").glob("*.png")}


@pytest.fixture(scope="module")
def meta(default_set) -> dict[str, dict]:
    return json.loads((default_set[0] / "meta.json").read_text())["images"]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------
# Generation mechanics


def test_default_generation_is_fast_and_complete(default_set):
    root, seconds = default_set
    # ~3 s on an idle 2-core machine; the bound only catches pathological slow-downs.
    assert seconds < 60.0, f"generation took {seconds:.1f} s"
    split_dir = root / "ImageSets/Segmentation"
    assert len(split_dir.joinpath("train.txt").read_text().split()) == 600
    assert len(split_dir.joinpath("val.txt").read_text().split()) == 120
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 720
    marker = json.loads((root / ".complete").read_text())
    assert marker["version"] == GENERATOR_VERSION and marker["params"]["num_train"] == 600


def test_same_seed_gives_byte_identical_trees(tmp_path):
    a = tree_bytes(make_synthetic_voc(tmp_path / "a", seed=3, **SMALL))
    b = tree_bytes(make_synthetic_voc(tmp_path / "b", seed=3, **SMALL))
    assert len(a) == 6 + 2 + 6 + 2 + 2 + 2  # jpgs, pngs, 2 split lists, meta, marker
    assert a == b


def test_other_seed_gives_other_images(tmp_path):
    a = tree_bytes(make_synthetic_voc(tmp_path / "a", seed=3, **SMALL))
    b = tree_bytes(make_synthetic_voc(tmp_path / "b", seed=4, **SMALL))
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.startswith("JPEGImages"))


def test_second_call_does_not_rewrite(tmp_path, monkeypatch):
    root = make_synthetic_voc(tmp_path / "s", **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args):
        raise AssertionError("regenerated a complete tree")

    monkeypatch.setattr(synthetic, "write_tree", fail)
    assert make_synthetic_voc(tmp_path / "s", **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_changed_parameters_regenerate_in_place(tmp_path):
    root = make_synthetic_voc(tmp_path / "s", **SMALL)
    make_synthetic_voc(root, **{**SMALL, "num_train": 3})
    assert (root / "ImageSets/Segmentation/train.txt").read_text().split() == [
        "train_00000", "train_00001", "train_00002",
    ]  # fmt: skip
    assert not (root / "JPEGImages/train_00005.jpg").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp folders left behind


def test_interrupted_generation_leaves_no_tree(tmp_path, monkeypatch):
    real = synthetic.render_sample
    calls = []

    def crash_on_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(synthetic, "render_sample", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_voc(tmp_path / "s", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_folder_of_a_dead_process_is_removed(tmp_path):
    stale = tmp_path / ".s.partial-999999999"  # no such pid
    (stale / "JPEGImages").mkdir(parents=True)
    make_synthetic_voc(tmp_path / "s", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine exists and is not a synthetic dataset"):
        make_synthetic_voc(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


def test_ensure_synthetic_names_the_folder_by_version_and_params(tmp_path):
    a = ensure_synthetic(tmp_path, **SMALL)
    assert a.parent == tmp_path and a.name.startswith(f"synthetic-v{GENERATOR_VERSION}-")
    assert ensure_synthetic(tmp_path, **SMALL) == a
    assert ensure_synthetic(tmp_path, **{**SMALL, "seed": 1}) != a
    with pytest.raises(ConfigError, match="unknown synthetic dataset parameter.*'size'"):
        ensure_synthetic(tmp_path, size=3)


# --------------------------------------------------------------------------------------------
# Content


def test_masks_are_palette_pngs_with_valid_ids(default_set):
    root, _ = default_set
    for path in sorted((root / "SegmentationClass").glob("*.png"))[:20]:
        with Image.open(path) as img:
            assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]
    assert len(SYNTHETIC_CLASSES) == 7 and SYNTHETIC_CLASSES[0] == "background"


def test_every_label_boundary_is_an_ignore_band(masks):
    valid = set(range(len(SYNTHETIC_CLASSES))) | {255}
    for name, mask in masks.items():
        assert set(np.unique(mask).tolist()) <= valid, name
        assert (mask == 255).any(), name
        # two different class ids never touch (4-neighbourhood) without 255 between them
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any(), name
        # and the band is thin: almost every 255 pixel has a labelled 8-neighbour
        ignore = mask == 255
        padded = np.pad(ignore, 1, constant_values=True)
        h, w = mask.shape
        enclosed = np.logical_and.reduce(
            [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
        )
        assert (enclosed & ignore).sum() <= 0.2 * ignore.sum(), name  # thin masts are all band


def test_images_are_multi_label_with_every_class(default_set):
    labels = image_labels(VOCLayout(default_set[0]), "train", len(SYNTHETIC_CLASSES), None)
    assert len(labels) == 600  # no image without a foreground class
    counts = np.stack(list(labels.values())).sum(1)
    assert 0.3 < (counts >= 2).mean() < 0.7
    assert counts.max() == 2
    per_class = np.stack(list(labels.values())).sum(0)
    assert per_class.min() > 60  # each of the 6 classes is common


def test_image_sizes_vary_around_the_base_size(default_set, meta):
    sizes = np.array([v["size"] for v in meta.values()])
    assert sizes.min() >= 128 and sizes.max() <= 192
    assert len(np.unique(sizes[:, 0])) > 20 and len(np.unique(sizes[:, 1])) > 20
    root = default_set[0]
    with Image.open(root / "JPEGImages/train_00007.jpg") as img:
        assert img.size == (meta["train_00007"]["size"][1], meta["train_00007"]["size"][0])


def test_boats_always_float_on_water_and_water_appears_without_boats(meta, masks, default_set):
    boat_images = [n for n, v in meta.items() if BOAT in v["classes"]]
    others = [n for n, v in meta.items() if BOAT not in v["classes"]]
    assert len(boat_images) > 60
    assert all(meta[n]["water"] is not None for n in boat_images)
    water_share = np.mean([meta[n]["water"] is not None for n in others])
    assert 0.08 < water_share < 0.25

    root = default_set[0]
    for name in boat_images[:40]:
        rows = meta[name]["water"]
        image = np.asarray(Image.open(root / f"JPEGImages/{name}.jpg").convert("RGB"), float)
        mask = masks[name]
        below = mask[rows["full"] :] == 0  # background under the surface is all water
        r, g, b = (image[rows["full"] :, :, c][below] for c in range(3))
        assert (b > r + 30).mean() > 0.9, name
        boat_rows = np.flatnonzero((mask == BOAT).any(1))
        # the hull dips into the band and the boat stands above it
        assert boat_rows.max() >= rows["top"] and boat_rows.min() < rows["top"], name


def test_voc_loaders_read_the_synthetic_set(default_set, masks, tmp_path):
    root = default_set[0]
    spec = DATASETS["synthetic"]
    train = build_train_dataset("synthetic", root, None, 96, tmp_path / "cache")
    sample = train[5]
    assert sample["image"].shape == (3, 96, 96) and sample["cls_label"].shape == (6,)
    present = set(np.unique(masks[sample["name"]]).tolist())
    expected = [c for c in range(1, spec.num_classes) if c in present]
    assert np.flatnonzero(sample["cls_label"].numpy()).tolist() == [c - 1 for c in expected]
    evaluation = build_eval_dataset("synthetic", root, None, tmp_path / "cache")
    assert len(evaluation) == 120
    first = evaluation[0]
    assert first["mask"].dtype == torch.int64
    np.testing.assert_array_equal(first["mask"].numpy(), masks["val_00000"])


def test_registry_generates_synthetic_under_cache_dir(tmp_path):
    ds = build_eval_dataset("synthetic", None, None, tmp_path, synthetic_params=SMALL)
    assert ds.layout.root.parent == tmp_path
    assert ds.layout.root.name.startswith(f"synthetic-v{GENERATOR_VERSION}-")
    assert len(ds) == 2 and ds[1]["name"] == "val_00001"
    with pytest.raises(ConfigError, match="cache_dir"):
        build_eval_dataset("synthetic", None, None, None)
