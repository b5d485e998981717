"""scripts/bench_scale.py at a tiny size: the generated trees read back through the project's
loaders with the counts asked for, and each measurement (start-up, prepare, evaluation RSS)
runs its real commands and reports consistent numbers. The full-size trees are never built here."""

from __future__ import annotations

import json

import pytest

from datasets import build_train_dataset
from datasets.coco_annotations import load_instances
from scripts import bench_scale


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("scale")
    for argv in (
        ["coco", "--count", "12", "--val-count", "4"],
        ["voc", "--count", "6", "--val-count", "2", "--image-size", "60", "80"],
        ["coco-val", "--count", "9"],
    ):
        assert (
            bench_scale.main(
                ["generate", *argv[:1], "--root", str(base / argv[0]), "--quiet", *argv[1:]]
            )
            == 0
        )
    return base


def test_generated_trees_have_the_asked_counts_and_formats(trees, tmp_path):
    coco = load_instances(trees / "coco" / "annotations" / "instances_train2014.json")
    raw = json.loads((trees / "coco" / "annotations" / "instances_train2014.json").read_text())
    assert len(raw["images"]) == 12 and len(raw["annotations"]) >= 12
    assert len(list((trees / "coco" / "train2014").glob("*.jpg"))) == 12
    assert len(list((trees / "coco" / "val2014").glob("*.jpg"))) == 4
    assert coco is not None
    voc = build_train_dataset(
        "voc", trees / "voc", "train_aug", 64, tmp_path / "c", label_source="annotations"
    )
    assert len(voc) == 6 and voc[0]["image"].shape == (3, 64, 64)
    assert (trees / "voc" / "ImageSets" / "Segmentation" / "val.txt").read_text().split() == [
        "2007_000000",
        "2007_000001",
    ]
    assert len(list((trees / "coco-val" / "val2014").glob("*.jpg"))) == 9


def test_startup_prepare_and_eval_rss_measure_their_commands(trees, tmp_path, capsys):
    scratch = ["--scratch", str(tmp_path)]
    out = tmp_path / "startup.json"
    assert (
        bench_scale.main(
            [
                "startup",
                "--dataset",
                "voc",
                "--root",
                str(trees / "voc"),
                *scratch,
                "--json",
                str(out),
            ]
        )
        == 0
    )
    runs = json.loads(out.read_text())["runs"]
    for r in runs.values():
        assert 0 < r["marker_seconds"] < r["seconds"] and r["peak_rss_mib"] > 100
    out = tmp_path / "prepare.json"
    assert (
        bench_scale.main(
            [
                "prepare",
                "--root",
                str(trees / "coco"),
                "--workers",
                "1",
                "2",
                *scratch,
                "--json",
                str(out),
            ]
        )
        == 0
    )
    prep = json.loads(out.read_text())
    assert prep["masks"] == 12
    for workers, r in prep["runs"].items():
        assert r["masks_per_s"] == pytest.approx(12 / r["seconds"])
        assert r["masks_per_s_per_worker"] == pytest.approx(r["masks_per_s"] / int(workers))
        assert r["seconds"] < r["process_seconds"]
    out = tmp_path / "eval.json"
    assert (
        bench_scale.main(
            [
                "eval-rss",
                "--root",
                str(trees / "coco-val"),
                "--first",
                "3",
                "--eval-workers",
                "0",
                *scratch,
                "--json",
                str(out),
            ]
        )
        == 0
    )
    ev = json.loads(out.read_text())
    assert ev["images"] == 9 and set(ev["runs"]) == {"3", "9"}
    assert ev["growth"] == pytest.approx(
        ev["runs"]["9"]["peak_rss_mib"] / ev["runs"]["3"]["peak_rss_mib"] - 1
    )
    assert "evaluation peak RSS, 9 val images" in capsys.readouterr().out
