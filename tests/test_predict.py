"""predict.py end to end: a folder of every kind of image (and two bad files) gives one mask of
the displayed size per readable image, names the bad files once and exits 0; lists, name
collisions, --cams, --strict, bad arguments; evaluate.py scores a release like its checkpoint."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate
import predict
from datasets.files import read_mask, voc_palette
from tests.fixtures import image_pixels, make_standard_voc_tree
from tests.test_api import picture, save_tiny_model
from tests.test_cli import run


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_model(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """Every kind of input in one tree; returns it and {name: displayed (width, height)}."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "sub").mkdir()
    Image.fromarray(picture(40, 56)).save(root / "plain.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 56 x 40, shown rotated: 40 x 56
    Image.fromarray(picture(40, 56)).save(root / "rotated.jpg", exif=exif)
    Image.fromarray(picture(36, 30)).convert("L").save(root / "sub" / "gray.jpg")
    rgba = np.dstack([picture(32, 48), np.full((32, 48), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "sub" / "alpha.png")
    Image.fromarray(image_pixels(30, 44)[..., 0].astype(np.uint16) * 257).save(root / "deep16.png")
    Image.fromarray(image_pixels(1500, 2000)).save(root / "large.jpg", quality=80)
    (root / "broken.jpg").write_bytes((root / "plain.jpg").read_bytes()[:300])  # truncated
    (root / "notes.png").write_text("this is a text file with an image name\n")
    (root / "README.txt").write_text("not an image extension: ignored\n")
    (root / ".hidden.jpg").write_text("hidden files are ignored\n")
    sizes = {
        "plain": (56, 40),
        "rotated": (40, 56),
        "sub/gray": (30, 36),
        "sub/alpha": (48, 32),
        "deep16": (44, 30),
        "large": (2000, 1500),
    }
    return root, sizes


def predict_run(model: Path, out: Path, *args: str) -> int:
    return run(
        predict,
        [
            "--model",
            str(model),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "2",
            *args,
        ],
    )


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_a_folder_of_every_kind_of_image(model_files, mixed_folder, tmp_path, capsys):
    from toco import load_segmenter

    root, sizes = mixed_folder
    out = tmp_path / "out"
    assert predict_run(model_files[1], out, str(root)) == 0
    err = capsys.readouterr().err
    for bad in ("broken.jpg", "notes.png"):
        assert sum(bad in line for line in err.splitlines()) == 1, err
    assert "README.txt" not in err and ".hidden" not in err
    masks = sorted(
        p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*") if p.is_file()
    )
    assert masks == sorted(f"{n}.png" for n in sizes)
    seg = load_segmenter(model_files[1])
    for name, (w, h) in sizes.items():
        png = Image.open(out / "masks" / f"{name}.png")
        assert png.mode == "P" and png.size == (w, h), name
        assert png.getpalette()[:30] == voc_palette()[:30]
        overlay = Image.open(out / "overlays" / f"{name}.jpg")
        assert overlay.width >= w and overlay.height > h  # the legend is underneath
        if name != "large":  # the CLI's mask is the API's mask for the same file
            np.testing.assert_array_equal(
                read_mask(out / "masks" / f"{name}.png"),
                seg.predict(root / Path(name + _ext(root, name))).mask,
            )
    lines = records(out)
    assert len(lines) == 8
    failed = {Path(r["path"]).name: r["error"] for r in lines if "error" in r}
    assert set(failed) == {"broken.jpg", "notes.png"}
    good = {r["mask"][len("masks/") : -len(".png")]: r for r in lines if "error" not in r}
    assert {n: (r["width"], r["height"]) for n, r in good.items()} == sizes
    for r in good.values():
        mask = read_mask(out / r["mask"])
        present = [k for k in np.unique(mask) if k != 0]
        assert [c["index"] for c in r["classes"]] == present
        for c in r["classes"]:
            assert c["score"] == r["scores"][c["name"]]
            assert c["area"] == pytest.approx(float((mask == c["index"]).mean()), abs=1e-6)
        assert r["seconds"] > 0 and len(r["scores"]) == 20
    assert not list(out.rglob(".*.tmp"))  # no temporary file left behind


def _ext(root: Path, name: str) -> str:
    return next(
        p.suffix for p in root.rglob("*") if p.with_suffix("").relative_to(root).as_posix() == name
    )


def test_strict_and_all_bad_inputs_exit_non_zero(model_files, mixed_folder, tmp_path, capsys):
    root, _ = mixed_folder
    assert predict_run(model_files[0], tmp_path / "strict", str(root), "--strict") == 2
    assert "2 of 8 input(s) could not be read (--strict)" in capsys.readouterr().err
    assert len(list((tmp_path / "strict" / "masks").rglob("*.png"))) == 6  # still written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("text")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert predict_run(model_files[0], tmp_path / "none", str(bad)) == 2
    err = capsys.readouterr().err
    assert "error: none of the 2 input(s) could be read" in err
    assert not (tmp_path / "none" / "masks").exists()


def test_lists_collisions_cams_and_the_output_inside_the_input(model_files, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "deep").mkdir(parents=True)
    for name, hw in (("a.jpg", (32, 40)), ("a.png", (20, 24)), ("deep/b.jpg", (28, 28))):
        Image.fromarray(picture(*hw)).save(photos / name)
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\nphotos/deep/b.jpg\n\nphotos/missing.jpg\nphotos/deep/b.jpg\n")
    out = photos / "predictions"  # inside the folder it predicts
    assert predict_run(model_files[0], out, str(photos), f"@{listing}", "--cams") == 0
    assert "missing.jpg" in capsys.readouterr().err
    lines = records(out)
    assert [r.get("mask") for r in lines] == [
        "masks/a.jpg.png",
        "masks/a.png.png",
        "masks/deep/b.png",
        None,
    ]
    assert Image.open(out / "masks" / "a.png.png").size == (24, 20)
    for r in lines[:3]:
        assert sorted(r["cams"]) == sorted(c["name"] for c in r["classes"])
        for path in r["cams"].values():
            assert Image.open(out / path).size == (r["width"], r["height"])
    # a second run over the same folder does not predict its own outputs
    assert predict_run(model_files[0], out, str(photos), "--no-overlays") == 0
    assert len(records(out)) == 3


@pytest.mark.parametrize(
    "args,needle",
    [
        (["missing_folder"], "input not found: missing_folder"),
        (["@nolist.txt"], "input list not found: nolist.txt"),
        ([], "no inputs"),
        (["--batch-size", "0", "."], "--batch-size must be >= 1"),
        (["--workers", "0", "."], "--workers must be >= 1"),
        (["--device", "cuda:7", "."], "cuda"),
        (["--device", "tpu", "."], "unknown --device 'tpu'"),
        (["--protocol", "best", "."], "invalid choice: 'best'"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    model_files, tmp_path, args, needle, capsys, monkeypatch
):
    (tmp_path / "x.jpg").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert predict_run(model_files[0], tmp_path / "out", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_is_one_line(model_files, mixed_folder, tmp_path, capsys, monkeypatch):
    import toco.predict.batch

    root, _ = mixed_folder
    (tmp_path / "file").write_text("")
    assert predict_run(model_files[0], tmp_path / "file", str(root)) == 2
    assert "--output" in capsys.readouterr().err

    def disk_full(path, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(toco.predict.batch, "write_bytes_atomic", disk_full)
    assert predict_run(model_files[0], tmp_path / "out", str(root / "plain.jpg")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write ") and "masks/plain.png" in err[-1], err


def test_empty_folder_and_help(model_files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert predict_run(model_files[0], tmp_path / "out", str(tmp_path / "empty")) == 2
    assert "no images found in" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        predict.main(["--help"])
    assert stop.value.code == 0 and "--protocol" in capsys.readouterr().out


def test_evaluate_scores_a_release_like_its_checkpoint(tmp_path):
    voc = make_standard_voc_tree(tmp_path / "VOC2012")
    ckpt, release = save_tiny_model(tmp_path / "model", data_root=voc)
    scores = []
    for model in (ckpt, release):
        out = tmp_path / f"{model.suffix}.json"
        assert (
            run(
                evaluate,
                [
                    "--checkpoint",
                    str(model),
                    "--device",
                    "cpu",
                    "--workers",
                    "0",
                    "--output-json",
                    str(out),
                ],
            )
            == 0
        )
        scores.append(json.loads(out.read_text()))
    assert scores[0]["iou"] == scores[1]["iou"] and scores[0]["miou"] == scores[1]["miou"]
    assert scores[1]["provenance"]["checkpoint"]["iteration"] == 3
