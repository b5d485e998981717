"""The Python API (toco.load_segmenter): the documented example runs, masks equal the argmax of
the model's own logits computed here, batches equal single images, checkpoint == release, and
every image mode and array dtype becomes the RGB the model sees."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets import DATASETS
from tests.fixtures import image_pixels
from toco.errors import UserError
from toco.images import array_to_rgb, pil_to_rgb, to_rgb

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = {
    "dataset": "voc",
    "backbone": "deit_tiny_patch16_224",
    "backbone_depth": 2,
    "aux_layer": 0,
    "pretrained": "none",
    "crop_size": 64,
    "local_crop_size": 32,
    "decoder_dim": 16,
    "val_scales": [1.0, 0.5],
    "cam_scales": [1.0, 0.5],
}


def save_tiny_model(
    folder: Path, data_root: Path | None = None, class_names: list[str] | None = None
) -> tuple[Path, Path]:
    """A random-weight 2-block ViT written by the project's own writers, as a training
    checkpoint and as a release file: (last.pt, model.safetensors)."""
    from toco.build import build_model
    from toco.checkpoint import save_checkpoint
    from toco.config import TrainConfig
    from toco.export import write_release

    cfg = TrainConfig.from_dict({**TINY_CONFIG, "data_root": str(data_root or folder)})
    names = class_names or list(DATASETS["voc"].class_names)
    torch.manual_seed(0)
    model = build_model(cfg, len(names), pretrained="none")
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, release = folder / "last.pt", folder / "model.safetensors"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "iteration": 3}, ckpt)
    write_release(release, model.state_dict(), cfg.to_dict(), iteration=3, class_names=names)
    return ckpt, release


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_model(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def segmenter(model_files):
    from toco import load_segmenter

    return load_segmenter(model_files[1], device="cpu")


def picture(h: int, w: int) -> np.ndarray:
    """Content with structure (gradients plus a bright square), so masks are not constant."""
    img = image_pixels(h, w)
    img[h // 4 : h // 2, w // 3 : w // 2] = (250, 30, 30)
    return img


@pytest.mark.parametrize("page", ["README.md", "docs/predict.md"])
def test_the_documented_example_runs_as_written(page, model_files, tmp_path, monkeypatch, capsys):
    text = (ROOT / page).read_text()
    example = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", text, re.DOTALL)
    block = example.group(1)
    (tmp_path / "model.safetensors").write_bytes(model_files[1].read_bytes())
    Image.fromarray(picture(48, 80)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, page, "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "(48, 80) uint8"
    assert printed[-1] == "(20, 48, 80)"


def test_import_toco_stays_cheap():
    code = "import sys, toco; assert 'torch' not in sys.modules; print(toco.__all__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "load_segmenter" in out.stdout


def test_mask_and_scores_equal_the_model_computed_directly(segmenter):
    """train-val: resize to the 64 px square, one pass, token logits upsampled to the square
    and then to the image (toco.method.inference's two resizes), argmax; the image score is the
    sigmoid of the classifier's logits on the same square."""
    img = picture(50, 70)
    pred = segmenter.predict(img)
    model = segmenter.model
    x = F.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255,
        size=(64, 64),
        mode="bilinear",
        align_corners=False,
    )
    with torch.no_grad():
        logits = F.interpolate(model(x), size=(64, 64), mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, size=(50, 70), mode="bilinear", align_corners=False)
        feats = model.backbone((x - model.pixel_mean) / model.pixel_std)
        expected_scores = torch.sigmoid(model.classifier(feats.tokens))[0]
    expected = logits.argmax(1)[0].numpy().astype(np.uint8)
    assert pred.mask.dtype == np.uint8 and pred.mask.shape == (50, 70)
    assert len(np.unique(expected)) > 1  # the check is not about a constant map
    np.testing.assert_array_equal(pred.mask, expected)
    names = DATASETS["voc"].class_names
    assert pred.labels == [names[k] for k in np.unique(expected) if k != 0]
    assert list(pred.scores) == list(names[1:])
    np.testing.assert_allclose(list(pred.scores.values()), expected_scores.numpy(), rtol=1e-5)
    assert pred.cam is None and pred.size == (70, 50)


def test_cam_on_request_is_the_protocol_cam_at_the_image_size(segmenter):
    from toco.method.inference import predict_cams

    img = picture(40, 56)
    pred = segmenter.predict(img, cam=True)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    cam, _ = predict_cams(segmenter.model, x, scales=(1.0, 0.5), flip=True, size=64)
    assert pred.cam.shape == (20, 40, 56) and pred.cam.dtype == np.float32
    assert pred.cam.min() >= 0 and pred.cam.max() <= 1
    np.testing.assert_allclose(pred.cam, cam[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("protocol", ["train-val", "voc-ms", "coco-ms"])
def test_a_list_of_mixed_sizes_equals_one_image_at_a_time(model_files, protocol):
    from toco import load_segmenter
    from toco.evaluation.protocol import build_protocol
    from toco.method.inference import predict_seg_logits

    seg = load_segmenter(model_files[0], protocol=protocol)
    if protocol == "coco-ms":  # its 448 square, only smaller: the same passes and fusions
        seg.protocol = build_protocol(protocol, seg.cfg, size=96)
    images = [picture(40, 56), picture(33, 47), picture(40, 56)]
    batch = seg.predict(images, cam=True)
    assert isinstance(batch, list) and len(batch) == 3
    for img, pred in zip(images, batch):
        alone = seg.predict(img, cam=True)
        np.testing.assert_array_equal(pred.mask, alone.mask)
        np.testing.assert_allclose(pred.cam, alone.cam, atol=1e-5)
        assert pred.scores == pytest.approx(alone.scores, abs=1e-5)
        # ... and the protocol's own function on the single image gives the same mask
        p = seg.protocol
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        logits = predict_seg_logits(
            seg.model,
            x,
            p.seg_scales,
            flip=p.flip,
            size=p.size,
            flip_fusion=p.flip_fusion,
            scale_fusion=p.scale_fusion,
        )
        np.testing.assert_array_equal(pred.mask, logits.argmax(1)[0].numpy())


def test_checkpoint_and_release_predict_the_same(model_files):
    from toco import load_segmenter

    ckpt, release = (load_segmenter(p) for p in model_files)
    assert ckpt.class_names == release.class_names == DATASETS["voc"].class_names
    img = picture(45, 61)
    a, b = ckpt.predict(img), release.predict(img)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.scores == b.scores


def test_class_names_come_from_the_release(tmp_path):
    from toco import load_segmenter

    names = ["background"] + [f"thing {i}" for i in range(1, 21)]
    _, release = save_tiny_model(tmp_path, class_names=names)
    seg = load_segmenter(str(release))
    assert seg.class_names == tuple(names)
    assert list(seg.predict(picture(32, 32)).scores) == names[1:]
    from toco.release import read_release

    palette = read_release(release)["palette"]  # one VOC colour per class, as the mask PNGs
    assert len(palette) == 21 and palette[:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


def test_more_classes_than_a_uint8_mask_holds_are_refused(segmenter):
    from toco.predict.segmenter import Segmenter

    model = segmenter.model
    model.num_classes = 256  # only the count is checked: no need to build a wider model
    try:
        with pytest.raises(UserError, match="at most 255 classes fit"):
            Segmenter(
                model,
                segmenter.cfg,
                [f"c{i}" for i in range(256)],
                segmenter.protocol,
                segmenter.device,
            )
    finally:
        model.num_classes = 21


def test_unusable_model_files_are_one_line_errors(tmp_path):
    from toco import load_segmenter

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(UserError, match="cannot read release file .*broken.safetensors"):
        load_segmenter(bad)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_segmenter(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="unknown --protocol"):
        load_segmenter(save_tiny_model(tmp_path / "m")[0], protocol="nope")


# ------------------------------------------------------------------------------------------
# images: every mode and dtype becomes (H, W, 3) uint8 RGB


def test_exif_orientation_is_applied(tmp_path):
    img = picture(30, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    Image.fromarray(img).save(path, exif=exif)
    out = to_rgb(path)
    assert out.shape == (50, 30, 3)
    np.testing.assert_array_equal(out, np.rot90(img, k=-1))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = (np.arange(12, dtype=np.uint16) * 257).reshape(3, 4)  # 8-bit k -> 16-bit 257 k
    values[0, 0] = 65535
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    out = to_rgb(path)
    expected = (values // 257).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=-1))
    np.testing.assert_array_equal(array_to_rgb(values)[..., 0], expected)
    np.testing.assert_array_equal(
        pil_to_rgb(Image.fromarray(values.astype(np.int32)))[..., 1], expected
    )


def test_transparency_is_composited_over_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, :, 3] = 255  # opaque row, transparent row, one half-transparent pixel
    rgba[1, 2, 3] = 128
    out = to_rgb(Image.fromarray(rgba, "RGBA"))
    assert out[0].tolist() == [[10, 20, 30]] * 3
    assert out[1, 0].tolist() == [255, 255, 255]
    a = 128 / 255
    assert out[1, 2].tolist() == [round(c * a + 255 * (1 - a)) for c in (10, 20, 30)]
    np.testing.assert_array_equal(array_to_rgb(rgba), out)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA"])
def test_other_pil_modes_become_rgb(mode):
    img = Image.fromarray(picture(8, 10)).convert(mode)
    out = to_rgb(img)
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    if mode in ("L", "LA"):
        gray = np.asarray(Image.fromarray(picture(8, 10)).convert("L"))
        np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))


def test_array_dtypes_by_their_range():
    base = np.array([[0, 51, 255]], dtype=np.uint8)
    expected = np.repeat(base[..., None], 3, axis=-1)
    for array in (
        base,
        base.astype(np.float32) / 255,
        base.astype(np.float64),
        base.astype(np.int64),
        base.astype(np.uint16) * 257,
        base[..., None],
    ):
        np.testing.assert_array_equal(array_to_rgb(array), expected, err_msg=str(array.dtype))
    assert array_to_rgb(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]


@pytest.mark.parametrize(
    "bad,needle",
    [
        (np.zeros((4, 4, 2), np.uint8), "must be \\(H, W\\)"),
        (np.zeros((0, 4), np.uint8), "must not be empty"),
        (np.full((2, 2), np.nan), "NaN"),
        (np.full((2, 2), -3), "0..255 or 0..65535"),
        (np.zeros((2, 2), np.complex64), "is not an image"),
        (42, "a path, a PIL image or a numpy array"),
    ],
)
def test_unusable_arrays_are_one_line_errors(bad, needle):
    with pytest.raises(UserError, match=needle):
        to_rgb(bad)


def test_an_unreadable_file_names_itself(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.jpg"):
        to_rgb(path)
