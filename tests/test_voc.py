"""VOC layout, label cache, input checks and ToCo training views."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import datasets.labels as labels_module
import datasets.parallel as parallel
import datasets.transforms as transforms
import datasets.voc as voc
from datasets import DATASETS, build_eval_dataset, build_train_dataset
from datasets.layout import SHIPPED_SPLITS
from datasets.voc import (
    VOC_CLASSES,
    BadImageWarning,
    PhotometricView,
    VOCEvalDataset,
    VOCLayout,
    VOCTrainDataset,
    image_labels,
    read_rgb,
    seed_worker,
    voc_palette,
)
from tests.fixtures import (
    STANDARD_LABELS,
    ImageSpec,
    boxes_mask,
    make_voc_tree,
    write_mask_png,
    write_voc_xml,
)
from toco.errors import ConfigError, DataError

# img_d of the standard tree has no foreground on purpose; tests that care use pytest.warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*no foreground class:UserWarning")


def onehot(classes: list[int], num_classes: int = 21) -> np.ndarray:
    vector = np.zeros(num_classes - 1, dtype=np.float32)
    vector[[c - 1 for c in classes]] = 1
    return vector


def decoded(root: Path, name: str) -> np.ndarray:
    return np.asarray(read_rgb(root / "JPEGImages" / f"{name}.jpg"))


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def sample_with_seed(ds, name: str, seed: int) -> dict:
    random.seed(seed)
    torch.manual_seed(seed)
    return ds[ds.names.index(name)]


# --------------------------------------------------------------------------------------------
# Constants


def test_voc_classes_are_the_standard_21_in_order():
    assert len(VOC_CLASSES) == 21
    assert VOC_CLASSES[:3] == ("background", "aeroplane", "bicycle")
    assert VOC_CLASSES[15] == "person" and VOC_CLASSES[20] == "tvmonitor"


def test_voc_palette_matches_known_colours():
    palette = voc_palette()
    assert len(palette) == 768
    assert palette[3:6] == [128, 0, 0]
    assert palette[15 * 3 : 16 * 3] == [192, 128, 128]
    assert palette[255 * 3 :] == [224, 224, 192]


# --------------------------------------------------------------------------------------------
# Image-level labels


def test_labels_are_exact_class_vectors_without_background(voc_root, cache_dir):
    with pytest.warns(UserWarning, match="1 image"):
        labels = image_labels(VOCLayout(voc_root), "train", 21, cache_dir)
    assert list(labels) == ["img_a", "img_b", "img_c", "img_e"]  # img_d has no foreground
    for name, vector in labels.items():
        assert vector.dtype == np.float32
        np.testing.assert_array_equal(vector, onehot(STANDARD_LABELS[name]))


def test_empty_label_images_are_kept_when_not_dropping(voc_root):
    labels = image_labels(VOCLayout(voc_root), "val", 21, None, drop_empty=False)
    assert list(labels) == ["img_a", "img_d", "img_e"]
    assert labels["img_d"].sum() == 0


def test_segmentation_class_aug_is_preferred(voc_root, cache_dir):
    aug = voc_root / "SegmentationClassAug"
    aug.mkdir()
    for name, hw in {"img_a": (40, 60), "img_d": (30, 40), "img_e": (44, 52)}.items():
        write_mask_png(aug / f"{name}.png", boxes_mask(*hw, [(9, 0, 5, 0, 5)]))
    labels = image_labels(VOCLayout(voc_root), "val", 21, cache_dir)
    assert VOCLayout(voc_root).mask_dir == aug
    for name in ("img_a", "img_d", "img_e"):
        np.testing.assert_array_equal(labels[name], onehot([9]))


def test_label_cache_is_json_and_reused(voc_root, cache_dir, monkeypatch):
    layout = VOCLayout(voc_root)
    first = image_labels(layout, "val", 21, cache_dir, drop_empty=False)
    (cache_file,) = cache_dir.iterdir()
    data = json.loads(cache_file.read_text())
    assert data["split"] == "val" and data["root"] == str(voc_root.resolve())
    assert data["entries"]["img_e"]["labels"] == [3, 12]
    assert data["entries"]["img_d"]["labels"] == []

    def no_scan(*args):
        raise AssertionError("mask re-read although the cache is valid")

    monkeypatch.setattr(labels_module, "scan_mask", no_scan)
    inode = cache_file.stat().st_ino  # an atomic rewrite would make a new inode
    second = image_labels(layout, "val", 21, cache_dir, drop_empty=False)
    assert {k: v.tolist() for k, v in first.items()} == {k: v.tolist() for k, v in second.items()}
    assert cache_file.stat().st_ino == inode  # nothing changed, nothing rewritten


def test_masks_scanned_in_processes_give_the_same_labels_and_the_same_error(tmp_path, monkeypatch):
    """A large scan runs in a pool (forced here on a small tree): same labels, same cache, and
    a bad mask raises the error of the first bad id in split order, as a plain loop does."""
    specs = [ImageSpec(f"im{i:02d}", boxes_mask(16, 16, [(1 + i % 20, 2, 9, 3, 12)]))
             for i in range(24)]  # fmt: skip
    root = make_voc_tree(tmp_path / "VOC", specs)
    layout = VOCLayout(root)
    plain = image_labels(layout, "train", 21, tmp_path / "plain")
    monkeypatch.setattr(labels_module, "MIN_MASKS_PER_WORKER", 1)
    monkeypatch.setattr(labels_module, "available_cores", lambda: 2)
    calls = []
    real = parallel.multiprocessing.get_context
    monkeypatch.setattr(parallel.multiprocessing, "get_context",
                        lambda method: calls.append(method) or real(method))  # fmt: skip
    pooled = image_labels(layout, "train", 21, tmp_path / "pooled")
    assert calls == ["fork"]  # the pool did the scan
    assert {k: v.tolist() for k, v in plain.items()} == {k: v.tolist() for k, v in pooled.items()}
    (plain_cache,), (pooled_cache,) = (
        (tmp_path / "plain").iterdir(),
        (tmp_path / "pooled").iterdir(),
    )
    assert (
        json.loads(plain_cache.read_text())["entries"]
        == json.loads(pooled_cache.read_text())["entries"]
    )
    for name, value in (("im17", 30), ("im05", 40)):  # two bad masks; im05 comes first
        Image.fromarray(np.full((16, 16), value, np.uint8), mode="L").convert("P").save(
            root / "SegmentationClass" / f"{name}.png"
        )
    for _ in range(2):  # pooled, then plain: the same message
        with pytest.raises(DataError, match=r"im05\.png holds values \[40\]"):
            image_labels(layout, "train", 21, None)
        monkeypatch.setattr(labels_module, "available_cores", lambda: 1)
    assert calls == ["fork", "fork"]  # the first of the two erring scans ran in the pool


def test_label_cache_entry_invalidated_when_mask_changes(voc_root, cache_dir):
    layout = VOCLayout(voc_root)
    image_labels(layout, "val", 21, cache_dir)
    mask_path = voc_root / "SegmentationClass" / "img_e.png"
    stat = mask_path.stat()
    write_mask_png(mask_path, boxes_mask(44, 52, [(18, 1, 9, 1, 9)]))
    os.utime(mask_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    labels = image_labels(layout, "val", 21, cache_dir)
    np.testing.assert_array_equal(labels["img_e"], onehot([18]))
    np.testing.assert_array_equal(labels["img_a"], onehot([1, 15]))


def test_label_cache_files_are_per_root_and_split(voc_root, cache_dir, tmp_path):
    spec = ImageSpec("x", boxes_mask(20, 20, [(2, 0, 9, 0, 9)]))
    other = make_voc_tree(tmp_path / "other", [spec])
    image_labels(VOCLayout(voc_root), "val", 21, cache_dir)
    image_labels(VOCLayout(voc_root), "train", 21, cache_dir)
    image_labels(VOCLayout(other), "train", 21, cache_dir)
    assert len(list(cache_dir.glob("*.json"))) == 3


# --------------------------------------------------------------------------------------------
# Bad inputs: every one is a DataError that names the file or folder


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        VOCTrainDataset(tmp_path / "nowhere", "train")


def test_missing_jpeg_folder(tmp_path):
    (tmp_path / "VOC").mkdir()
    with pytest.raises(DataError, match="JPEGImages"):
        VOCTrainDataset(tmp_path / "VOC", "train")


def test_missing_split_lists_existing_splits(voc_root):
    with pytest.raises(DataError) as err:
        VOCTrainDataset(voc_root, "trainval_x")
    message = str(err.value)
    assert "trainval_x.txt" in message and "test, train, train_aug, val" in message


def test_split_naming_missing_images(voc_root):
    (voc_root / "ImageSets/Segmentation/bad.txt").write_text("img_a\nghost1\n\nghost2\n")
    with pytest.raises(DataError) as err:
        VOCTrainDataset(voc_root, "bad")
    message = str(err.value)
    assert "bad.txt" in message and "2 image(s)" in message and "ghost1, ghost2" in message


def test_duplicate_ids(voc_root):
    (voc_root / "ImageSets/Segmentation/dup.txt").write_text("img_a\nimg_b\nimg_a\n")
    with pytest.raises(DataError, match=r"dup\.txt repeats 1 id\(s\): img_a"):
        VOCTrainDataset(voc_root, "dup")


def test_empty_split(voc_root):
    (voc_root / "ImageSets/Segmentation/empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt lists no image ids"):
        VOCTrainDataset(voc_root, "empty")


def test_missing_mask(voc_root):
    (voc_root / "SegmentationClass/img_e.png").unlink()
    with pytest.raises(DataError, match="1 id.* no mask in .*SegmentationClass: img_e"):
        VOCTrainDataset(voc_root, "val")


def test_garbage_jpeg_names_the_file(voc_root):
    (voc_root / "JPEGImages/img_b.jpg").write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(DataError, match=r"img_b\.jpg"):
        VOCTrainDataset(voc_root, "train")  # the label pass reads the JPEG header
    ds = VOCEvalDataset(voc_root, "test", with_masks=False)
    with pytest.raises(DataError, match=r"cannot read image .*img_b\.jpg"):
        ds[0]


def test_truncated_jpeg_names_the_file(voc_root):
    path = voc_root / "JPEGImages/img_a.jpg"
    path.write_bytes(path.read_bytes()[:-200])  # cut into the entropy-coded data
    assert voc.image_size(path) == (60, 40)  # the header is intact, so the label pass passes
    ds = VOCTrainDataset(voc_root, "train", crop_size=32)
    with pytest.raises(DataError, match=r"cannot read image .*img_a\.jpg.*truncated"):
        ds[ds.names.index("img_a")]


def test_mask_size_mismatch_names_both_files(tmp_path):
    spec = ImageSpec("odd", boxes_mask(20, 30, [(4, 2, 8, 2, 8)]), image_hw=(21, 30))
    root = make_voc_tree(tmp_path / "VOC", [spec])
    with pytest.raises(DataError) as err:
        VOCTrainDataset(root, "train")
    message = str(err.value)
    assert "odd.png is 30x20" in message and "odd.jpg is 30x21" in message


def test_out_of_range_mask_value_names_file_and_values(tmp_path):
    mask = boxes_mask(20, 20, [(4, 2, 8, 2, 8), (21, 10, 12, 10, 12), (254, 15, 16, 15, 16)])
    root = make_voc_tree(tmp_path / "VOC", [ImageSpec("bad", mask)])
    with pytest.raises(DataError, match=r"bad\.png holds values \[21, 254\] outside 0\.\.20"):
        VOCTrainDataset(root, "train")


def test_rgb_mask_is_rejected(tmp_path):
    spec = ImageSpec("rgb", boxes_mask(20, 20, [(4, 2, 8, 2, 8)]), mask_mode="RGB")
    root = make_voc_tree(tmp_path / "VOC", [spec])
    with pytest.raises(DataError, match=r"rgb\.png has mode RGB"):
        VOCTrainDataset(root, "train")


def test_eval_rechecks_mask_size_at_load(voc_root):
    ds = VOCEvalDataset(voc_root, "val")
    write_mask_png(voc_root / "SegmentationClass/img_a.png", boxes_mask(41, 60, []))
    with pytest.raises(DataError, match=r"img_a\.png is 60x41 but image .*img_a\.jpg is 60x40"):
        ds[ds.names.index("img_a")]


def test_bad_config_values_are_config_errors(voc_root):
    with pytest.raises(ConfigError):
        VOCTrainDataset(voc_root, "train", crop_size=0)
    with pytest.raises(ConfigError):
        VOCTrainDataset(voc_root, "train", scale_range=(2.0, 1.0))


# --------------------------------------------------------------------------------------------
# Training samples


@pytest.fixture
def quiet_train(voc_root, cache_dir):
    """A train-set builder that silences the expected empty-label warning."""

    def build(**kwargs) -> VOCTrainDataset:
        with pytest.warns(UserWarning, match="no foreground"):
            return VOCTrainDataset(voc_root, "train", cache_dir=cache_dir, **kwargs)

    return build


def test_train_sample_keys_dtypes_shapes_and_labels(quiet_train):
    ds = quiet_train(crop_size=48)
    assert ds.names == ["img_a", "img_b", "img_c", "img_e"]
    for index, name in enumerate(ds.names):
        sample = ds[index]
        assert sample["name"] == name
        for key in ("image", "view2", "local_view"):
            assert sample[key].dtype == torch.uint8 and sample[key].shape == (3, 48, 48)
        assert sample["cls_label"].dtype == torch.float32
        np.testing.assert_array_equal(sample["cls_label"].numpy(), onehot(STANDARD_LABELS[name]))
        y0, y1, x0, x1 = sample["img_box"].tolist()
        assert sample["img_box"].dtype == torch.int64
        assert 0 <= y0 < y1 <= 48 and 0 <= x0 < x1 <= 48


def test_img_box_marks_the_real_pixels_of_a_padded_crop(quiet_train, voc_root):
    ds = quiet_train(crop_size=64, scale_range=(1.0, 1.0), photometric=False)
    original = decoded(voc_root, "img_a")  # 40 x 60, smaller than the crop
    flips = set()
    for seed in range(12):
        sample = sample_with_seed(ds, "img_a", seed)
        y0, y1, x0, x1 = sample["img_box"].tolist()
        assert (y1 - y0, x1 - x0) == (40, 60)
        image = hwc(sample["image"])
        padding = image.copy()
        padding[y0:y1, x0:x1] = 0
        assert padding.max() == 0
        inside = image[y0:y1, x0:x1]
        mirrored = np.array_equal(inside, original[:, ::-1])
        assert mirrored or np.array_equal(inside, original)
        flips.add(mirrored)
    assert flips == {True, False}  # the geometric flip happens, both ways


def test_crop_of_a_large_image_is_a_window_of_it(quiet_train, voc_root):
    ds = quiet_train(crop_size=24, scale_range=(1.0, 1.0), photometric=False)
    original = decoded(voc_root, "img_a")
    for seed in range(4):
        sample = sample_with_seed(ds, "img_a", seed)
        assert sample["img_box"].tolist() == [0, 24, 0, 24]
        crop = hwc(sample["image"])
        windows = [
            source[y : y + 24, x : x + 24]
            for source in (original, original[:, ::-1])
            for y in range(40 - 24 + 1)
            for x in range(60 - 24 + 1)
        ]
        assert any(np.array_equal(crop, w) for w in windows)


def test_aligned_flip_keeps_local_view_identical_to_main_view(quiet_train):
    ds = quiet_train(crop_size=40, photometric=False, align_local_flip=True)
    for seed in range(10):
        sample = sample_with_seed(ds, "img_a", seed)
        assert torch.equal(sample["image"], sample["local_view"])


def test_reference_flip_mirrors_local_view_half_the_time(quiet_train):
    ds = quiet_train(crop_size=40, photometric=False, align_local_flip=False)
    outcomes = []
    for seed in range(24):
        sample = sample_with_seed(ds, "img_a", seed)
        same = torch.equal(sample["image"], sample["local_view"])
        mirrored = torch.equal(sample["image"], sample["local_view"].flip(-1))
        assert same or mirrored
        outcomes.append(mirrored and not same)
    assert 3 <= sum(outcomes) <= 21  # B2: independent flips disagree about half the time


def test_same_seed_same_sample_and_new_seed_new_sample(quiet_train):
    ds = quiet_train(crop_size=40)
    a, b, c = (sample_with_seed(ds, "img_e", s) for s in (3, 3, 4))
    for key in ("image", "view2", "local_view", "img_box"):
        assert torch.equal(a[key], b[key])
    assert not all(torch.equal(a[k], c[k]) for k in ("image", "view2", "local_view"))


def test_views_use_the_reference_probabilities(quiet_train):
    ds = quiet_train()
    assert (ds.main_view.blur_p, ds.main_view.solarize_p) == (1.0, 0.0)
    assert (ds.local_view.blur_p, ds.local_view.solarize_p) == (0.5, 0.0)
    assert (ds.second_view.blur_p, ds.second_view.solarize_p) == (0.1, 0.2)
    assert ds.main_view.flip is None and ds.local_view.flip is None  # aligned by default
    assert ds.second_view.flip is not None
    crop = ds.resized_crop
    assert (crop.size, crop.scale) == ((448, 448), (0.4, 1.0))
    assert crop.interpolation.value == "bicubic"


def test_photometric_view_blurs_and_solarizes_as_configured(monkeypatch):
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    radii = []

    class RecordingBlur(transforms.ImageFilter.GaussianBlur):
        def __init__(self, radius):
            radii.append(radius)
            super().__init__(radius)

    monkeypatch.setattr(transforms.ImageFilter, "GaussianBlur", RecordingBlur)
    view = PhotometricView(flip=False, blur_p=1.0, solarize_p=1.0)
    view.colour = lambda x: x  # isolate blur and solarize from the colour jitter
    out = np.asarray(view(img))
    assert len(radii) == 1 and 0.1 <= radii[0] <= 2.0
    assert (out == 255 - 200).all()  # solarize at threshold 128 inverts 200
    view = PhotometricView(flip=False, blur_p=0.0, solarize_p=0.0)
    view.colour = lambda x: x
    assert (np.asarray(view(img)) == 200).all() and len(radii) == 1


def test_grayscale_and_cmyk_images_become_rgb(quiet_train, voc_root):
    ds = VOCEvalDataset(voc_root, "test", with_masks=False)
    gray = ds[ds.names.index("img_b")]["image"]
    assert gray.shape == (3, 50, 30)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    cmyk = ds[ds.names.index("img_c")]["image"]
    expected = np.asarray(Image.open(voc_root / "JPEGImages/img_c.jpg").convert("RGB"))
    np.testing.assert_array_equal(hwc(cmyk), expected)


def test_train_batches_collate_with_the_default_collate(quiet_train):
    loader = DataLoader(quiet_train(crop_size=32), batch_size=2, shuffle=False)
    batch = next(iter(loader))
    assert batch["name"] == ["img_a", "img_b"]
    assert batch["image"].shape == (2, 3, 32, 32) and batch["img_box"].shape == (2, 4)
    np.testing.assert_array_equal(batch["cls_label"][1].numpy(), onehot([7]))


def test_seed_worker_seeds_numpy_from_torch():
    torch.manual_seed(7)
    seed_worker(0)
    first = np.random.rand(3)
    torch.manual_seed(7)
    seed_worker(0)
    np.testing.assert_array_equal(first, np.random.rand(3))


# --------------------------------------------------------------------------------------------
# Evaluation samples


def test_eval_sample_holds_exact_image_and_mask(voc_root, cache_dir):
    ds = VOCEvalDataset(voc_root, "val", cache_dir=cache_dir)
    assert ds.names == ["img_a", "img_d", "img_e"]
    loader = DataLoader(ds, batch_size=1, shuffle=False)
    for name, batch in zip(ds.names, loader):
        assert batch["name"] == [name]
        mask = np.asarray(Image.open(voc_root / f"SegmentationClass/{name}.png"))
        assert batch["mask"].dtype == torch.int64
        np.testing.assert_array_equal(batch["mask"][0].numpy(), mask)
        assert batch["image"].dtype == torch.uint8
        np.testing.assert_array_equal(hwc(batch["image"][0]), decoded(voc_root, name))
        np.testing.assert_array_equal(batch["cls_label"][0].numpy(), onehot(STANDARD_LABELS[name]))
    assert (ds[ds.names.index("img_a")]["mask"] == 255).any()


def test_eval_without_masks_serves_the_test_split(voc_root):
    (voc_root / "SegmentationClass").rename(voc_root / "elsewhere")
    ds = VOCEvalDataset(voc_root, "test", with_masks=False)
    sample = ds[0]
    assert sample["name"] == "img_b" and "mask" not in sample
    assert sample["cls_label"].tolist() == [0.0] * 20
    with pytest.raises(DataError, match="neither SegmentationClassAug/ nor SegmentationClass/"):
        VOCEvalDataset(voc_root, "test")


# --------------------------------------------------------------------------------------------
# Registry


def test_unknown_dataset_lists_known_ones(voc_root):
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'.*coco, synthetic, tags, voc"):
        build_train_dataset("imagenet", voc_root, "train", 32, None)


def test_voc_needs_a_root():
    with pytest.raises(ConfigError, match="needs a root"):
        build_eval_dataset("voc", None, None, None)


def test_registry_builds_voc_datasets(voc_root, cache_dir):
    assert DATASETS["voc"].num_classes == 21 and DATASETS["voc"].train_split == "train_aug"
    ds = build_eval_dataset("voc", voc_root, None, cache_dir)  # default split: val
    assert ds.names == ["img_a", "img_d", "img_e"]
    with pytest.warns(UserWarning):
        train = build_train_dataset("voc", voc_root, "train", 32, cache_dir, photometric=False)
    assert train.crop_size == 32 and train[0]["cls_label"].shape == (20,)


# --------------------------------------------------------------------------------------------
# Split lists shipped with the project


def shipped(name: str) -> list[str]:
    return (SHIPPED_SPLITS / "voc" / f"{name}.txt").read_text().split()


def test_shipped_voc_split_lists_have_the_standard_sizes_and_relations():
    lists = {name: shipped(name) for name in ("train_aug", "train", "val", "test")}
    assert {k: len(v) for k, v in lists.items()} == {
        "train_aug": 10582, "train": 1464, "val": 1449, "test": 1456}  # fmt: skip
    for name, ids in lists.items():
        assert len(set(ids)) == len(ids), name
        assert all(len(i) == 11 and i[4] == "_" and i.replace("_", "").isdigit() for i in ids)
    aug = set(lists["train_aug"])
    assert set(lists["train"]) <= aug
    assert not aug & set(lists["val"]) and not aug & set(lists["test"])
    assert not set(lists["val"]) & set(lists["test"])
    assert lists["train_aug"][:2] == ["2007_000032", "2007_000039"]
    assert lists["val"][0] == "2007_000033" and lists["test"][-1] == "2011_003231"


def test_root_lists_win_over_shipped_ones(voc_root):
    layout = VOCLayout(voc_root)
    assert layout.split_path("train_aug") == SHIPPED_SPLITS / "voc" / "train_aug.txt"
    assert layout.split_path("val") == voc_root / "ImageSets/Segmentation/val.txt"
    with pytest.raises(DataError, match=r"train_aug\.txt names 10582 image\(s\) missing"):
        layout.read_split("train_aug")
    assert VOCLayout(voc_root, shipped_splits=None).available_splits() == ["test", "train", "val"]


# --------------------------------------------------------------------------------------------
# Labels from Annotations/*.xml where masks are missing


def test_training_labels_fall_back_to_xml_annotations(voc_root, cache_dir):
    (voc_root / "SegmentationClass/img_e.png").unlink()
    write_voc_xml(voc_root / "Annotations/img_e.xml", (44, 52), ["person", "sheep", "person"],
                  difficult=[False, True])  # fmt: skip
    with pytest.warns(UserWarning, match="1 image.* have no mask; their labels come from"):
        ds = VOCTrainDataset(voc_root, "val", cache_dir=cache_dir)
    np.testing.assert_array_equal(ds.labels["img_e"], onehot([15, 17]))  # difficult counts
    np.testing.assert_array_equal(ds.labels["img_a"], onehot([1, 15]))  # still from its mask
    with pytest.raises(DataError, match="1 id.* no mask in .*SegmentationClass: img_e"):
        VOCEvalDataset(voc_root, "val")  # scoring needs the mask itself


def test_xml_with_an_unknown_class_names_the_file(voc_root):
    (voc_root / "SegmentationClass/img_e.png").unlink()
    write_voc_xml(voc_root / "Annotations/img_e.xml", (44, 52), ["unicorn"])
    with pytest.raises(DataError, match=r"annotation .*img_e\.xml names unknown class 'unicorn'"):
        VOCTrainDataset(voc_root, "val")


def test_test_split_labels_come_from_xml_without_masks(voc_root):
    write_voc_xml(voc_root / "Annotations/img_b.xml", (50, 30), ["cat", "chair"])
    ds = VOCEvalDataset(voc_root, "test", with_masks=False)
    assert ds.names == ["img_b", "img_c"] and "mask" not in ds[0]
    np.testing.assert_array_equal(ds.labels["img_b"], onehot([8, 9]))
    assert ds.labels["img_c"].sum() == 0  # no annotation file: no labels


# --------------------------------------------------------------------------------------------
# skip_bad_images


def test_corrupt_training_image_is_skipped_once_with_a_warning(voc_root, cache_dir):
    path = voc_root / "JPEGImages/img_b.jpg"
    path.write_bytes(path.read_bytes()[:-150])
    with pytest.warns(UserWarning, match="no foreground"):
        strict = VOCTrainDataset(voc_root, "train", crop_size=24, cache_dir=cache_dir)
        ds = VOCTrainDataset(voc_root, "train", crop_size=24, cache_dir=cache_dir,
                             skip_bad_images=True)  # fmt: skip
    index = ds.names.index("img_b")
    with pytest.raises(DataError, match=r"img_b\.jpg"):
        strict[index]
    with pytest.warns(BadImageWarning, match=r"skipping a training image: .*img_b\.jpg") as rec:
        sample = ds[index]
        again = ds[index]
    assert len(rec) == 1  # reported once, by name
    assert sample["name"] == again["name"] == ds.names[index + 1]
    for name in ds.names:
        if name != "img_b":
            (voc_root / f"JPEGImages/{name}.jpg").write_bytes(b"broken")
    with pytest.warns(BadImageWarning):
        with pytest.raises(DataError, match="no readable image left in split 'train'"):
            ds[0]
