"""evaluate.py end to end on one tiny trained run: the in-training protocol reproduces the
run's own validation, pseudo-label export, server archive, provenance, the HTML report in a
real browser, and sharded (2-process) evaluation equal to a single process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
from datasets.files import read_mask, voc_palette
from tests.fixtures import STANDARD_SPLITS, make_standard_voc_tree
from tests.test_cli import assert_user_error, run, train_args
from toco.checkpoint import load_checkpoint
from toco.evaluation.pseudo import PseudoLabelScores
from toco.evaluation.submission import VOC_RESULTS_DIR


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("evalcli")
    root = make_standard_voc_tree(base / "VOC2012")
    work = base / "run"
    assert (
        run(
            train,
            train_args(
                root,
                work,
                "--max-iters",
                "2",
                "--seg-start-iter",
                "1",
                "--warmup-iters",
                "1",
                "--eval-every",
                "2",
                "--save-every",
                "2",
                "--lr",
                "1e-3",
            ),
        )
        == 0
    )
    return root, work / "checkpoints" / "last.pt"


def evaluate_json(ckpt: Path, out: Path, *extra: str) -> dict:
    assert (
        run(
            evaluate,
            ["--checkpoint", str(ckpt), "--workers", "0", "--output-json", str(out), *extra],
        )
        == 0
    )
    return json.loads(out.read_text())


def test_train_val_protocol_reproduces_the_in_training_validation(trained, tmp_path):
    _, ckpt = trained
    final = json.loads((ckpt.parent.parent / "final.json").read_text())
    seg = evaluate_json(ckpt, tmp_path / "seg.json", "--protocol", "train-val")
    cam = evaluate_json(ckpt, tmp_path / "cam.json", "--mode", "cam")  # train-val by default
    assert seg["protocol"] == cam["protocol"] == "train-val"
    assert seg["miou"] == final["seg_miou"]
    assert cam["miou"] == final["cam_miou"] and cam["aux_cam_miou"] == final["aux_cam_miou"]
    assert seg["iou"] == final["validation"]["seg"]["iou"]
    # a multi-scale protocol is a different number from the same weights
    ms = evaluate_json(ckpt, tmp_path / "ms.json", "--protocol", "voc-ms")
    assert ms["protocol"] == "voc-ms" and ms["scales"] == [1.0, 1.5, 1.25] and ms["flip"]


def test_provenance_traces_the_number(trained, tmp_path):
    _, ckpt = trained
    record = evaluate_json(ckpt, tmp_path / "p.json", "--protocol", "coco-ms", "--crf")
    prov = record["provenance"]
    assert prov["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert prov["checkpoint"]["iteration"] == 2
    assert prov["train_config"] == load_checkpoint(ckpt)["config"]
    assert prov["protocol"]["name"] == "coco-ms" and prov["protocol"]["size"] == 448
    assert prov["protocol"]["seg_scales"] == [1.0, 1.25, 1.5]
    assert (prov["protocol"]["flip_fusion"], prov["protocol"]["scale_fusion"]) == ("max", "sum")
    assert prov["protocol"]["crf"] == "torch"
    assert prov["protocol"]["crf_params"]["bilateral_srgb"] == 5.0
    assert prov["data"] == {"dataset": "voc", "split": "val", "num_images": 3}
    assert prov["world_size"] == 1 and record["world_size"] == 1
    assert "git_commit" in prov["code"] or "package_version" in prov["code"]


@pytest.mark.parametrize("crf", [False, True])
def test_pseudo_labels_export_round_trip(trained, tmp_path, crf):
    root, ckpt = trained
    out = tmp_path / "pseudo"
    record = evaluate_json(
        ckpt,
        tmp_path / "ps.json",
        "--mode",
        "pseudo",
        "--split",
        "val",
        "--save-dir",
        str(out),
        *(["--crf"] if crf else []),
    )
    assert record["mode"] == "pseudo" and record["cam_source"] == "cam"
    crf_params = record["provenance"]["protocol"]["crf_params"]
    assert (crf_params["bilateral_sxy"] == 36.0) if crf else crf_params is None
    ids = STANDARD_SPLITS["val"]
    split_list = out / "ImageSets" / "Segmentation" / "val.txt"
    assert split_list.read_text().split() == ids
    scores = PseudoLabelScores(21, torch.device("cpu"))
    for name in ids:
        png = Image.open(out / "SegmentationClassAug" / f"{name}.png")
        assert png.mode == "P" and png.getpalette()[:63] == voc_palette()[:63]
        label = np.asarray(png)
        gt = read_mask(root / "SegmentationClass" / f"{name}.png")
        assert label.shape == gt.shape
        assert set(np.unique(label)) <= set(range(21)) | {255}
        scores.update(
            torch.from_numpy(label.astype(np.int64)), torch.from_numpy(gt.astype(np.int64))
        )
    # the PNGs on disk are exactly the labels that were scored
    assert scores.ignored.miou() == record["miou"]
    assert scores.strict.miou() == record["miou_uncertain_as_miss"]
    assert scores.coverage == record["coverage"] and 0 < record["coverage"] <= 1
    assert json.loads((out / "evaluation.json").read_text())["miou"] == record["miou"]


def test_voc_submission_archive(trained, tmp_path):
    root, ckpt = trained
    out = tmp_path / "sub"
    assert (
        run(
            evaluate,
            [
                "--checkpoint",
                str(ckpt),
                "--workers",
                "0",
                "--split",
                "test",
                "--protocol",
                "voc-ms",
                "--submission",
                "voc",
                "--save-dir",
                str(out),
            ],
        )
        == 0
    )
    unpacked = tmp_path / "unpacked"
    with tarfile.open(out / "results.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    pngs = sorted((unpacked / VOC_RESULTS_DIR).iterdir())
    assert [p.stem for p in pngs] == STANDARD_SPLITS["test"]
    assert sorted(str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if p.is_file()) == [
        f"{VOC_RESULTS_DIR}/{n}.png" for n in STANDARD_SPLITS["test"]
    ]
    for png in pngs:
        img = Image.open(png)
        with Image.open(root / "JPEGImages" / f"{png.stem}.jpg") as jpeg:
            assert img.size == jpeg.size
        assert img.mode == "P" and img.getpalette()[:63] == voc_palette()[:63]
        assert np.asarray(img).max() <= 20


def test_bad_combinations_are_one_line_errors(trained, capsys, tmp_path):
    root, ckpt = trained
    base = ["--checkpoint", str(ckpt)]
    unlabelled = shutil.copytree(root, tmp_path / "voc")
    for name in STANDARD_SPLITS["test"]:
        (unlabelled / "SegmentationClass" / f"{name}.png").unlink()
    code = run(
        evaluate,
        base
        + [
            "--split",
            "test",
            "--data-root",
            str(unlabelled),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    )
    assert_user_error(capsys, code, "img_b", "--predict-only")
    assert_user_error(capsys, run(evaluate, base + ["--submission", "voc"]), "--save-dir")
    assert_user_error(
        capsys,
        run(evaluate, base + ["--report", "r", "--predict-only", "--save-dir", "x"]),
        "--report needs",
    )
    assert_user_error(capsys, run(evaluate, base + ["--protocol", "voc"]), "invalid choice")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_report_renders_in_headless_chromium(trained, tmp_path):
    _, ckpt = trained
    report = tmp_path / "report"
    record = evaluate_json(
        ckpt, tmp_path / "r.json", "--report", str(report), "--report-images", "1"
    )
    page = (report / "index.html").read_text()
    # a copy of the page with a probe that writes what the browser rendered into the DOM
    probe = """<script>window.addEventListener('load', () => {
      const imgs = [...document.images];
      const out = document.createElement('pre'); out.id = 'render-check';
      out.textContent = JSON.stringify({images: imgs.length,
        loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
        bars: [...document.querySelectorAll('#iou-chart rect.bar')]
          .filter(r => r.getBBox().width > 0).length});
      document.body.appendChild(out);});</script>"""
    check = report / "check.html"
    check.write_text(page.replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            check.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = json.loads(dom.split('<pre id="render-check">')[1].split("</pre>")[0])
    assert found["images"] == 10  # worst 1 + best 1, five panels each
    assert found["loaded"] == 10
    assert found["bars"] == sum(1 for v in record["iou"].values() if v)
    assert found["bars"] >= 1


def _sharded_worker(
    rank: int, world: int, init_file: str, argv_sets: list[list[str]], expected_code: int = 0
) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for i, argv in enumerate(argv_sets):
        # a short timeout: a rank left waiting fails the test instead of hanging it
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}.{i}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        code = run(evaluate, argv)  # evaluate tears the group down at the end
        assert code == expected_code, (rank, code)


def test_two_processes_give_exactly_the_single_process_numbers(trained, tmp_path):
    import torch.multiprocessing as mp

    _, ckpt = trained

    def argv(kind: str, tag: str) -> list[str]:
        extra = (
            ["--mode", "pseudo", "--protocol", "voc-ms"]
            if kind == "pseudo"
            else [
                "--protocol",
                "voc-ms",
                "--report",
                str(tmp_path / f"rep_{tag}"),
                "--report-images",
                "1",
            ]
        )
        return [
            "--checkpoint",
            str(ckpt),
            "--workers",
            "0",
            "--split",
            "train",
            *extra,
            "--save-dir",
            str(tmp_path / f"{kind}_{tag}"),
            "--output-json",
            str(tmp_path / f"{kind}_{tag}.json"),
        ]

    kinds = ("seg", "pseudo")
    for kind in kinds:
        assert run(evaluate, argv(kind, "single")) == 0
    # fork: the children need no fresh interpreter (spawn would re-import torch, ~10 s each)
    mp.start_processes(
        _sharded_worker,
        nprocs=2,
        start_method="fork",
        args=(2, str(tmp_path / "pg"), [argv(k, "sharded") for k in kinds]),
    )
    for kind in kinds:
        single = json.loads((tmp_path / f"{kind}_single.json").read_text())
        sharded = json.loads((tmp_path / f"{kind}_sharded.json").read_text())
        assert sharded["world_size"] == 2 and single["world_size"] == 1
        assert sharded["provenance"]["world_size"] == 2
        for key in ("miou", "iou", "num_images", "coverage", "miou_uncertain_as_miss"):
            assert sharded.get(key) == single.get(key), (kind, key)
        files = {
            d: sorted(
                p.relative_to(tmp_path / f"{kind}_{d}")
                for p in (tmp_path / f"{kind}_{d}").rglob("*.png")
            )
            for d in ("single", "sharded")
        }
        assert files["single"] == files["sharded"] and len(files["single"]) >= 4
        for rel in files["single"]:
            assert (tmp_path / f"{kind}_single" / rel).read_bytes() == (
                tmp_path / f"{kind}_sharded" / rel
            ).read_bytes()
    single_report = (tmp_path / "rep_single" / "index.html").read_text()
    sharded_report = (tmp_path / "rep_sharded" / "index.html").read_text()
    assert sorted(p.name for p in (tmp_path / "rep_single" / "images").iterdir()) == sorted(
        p.name for p in (tmp_path / "rep_sharded" / "images").iterdir()
    )
    assert single_report.count("<img") == sharded_report.count("<img") == 10


def test_a_failing_process_stops_all_of_them(trained, tmp_path, capfd):
    import torch.multiprocessing as mp

    root, ckpt = trained
    broken = shutil.copytree(root, tmp_path / "voc")
    jpeg = broken / "JPEGImages" / "img_e.jpg"  # 3rd val image: rank 0's shard of 2
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) * 3 // 4])  # header readable, pixels truncated
    argv = [
        "--checkpoint",
        str(ckpt),
        "--workers",
        "0",
        "--data-root",
        str(broken),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--output-json",
        str(tmp_path / "x.json"),
    ]
    mp.start_processes(
        _sharded_worker, nprocs=2, start_method="fork", args=(2, str(tmp_path / "pg"), [argv], 2)
    )
    err = capfd.readouterr().err
    assert "img_e.jpg" in err and "another process failed" in err
    assert not (tmp_path / "x.json").exists()
