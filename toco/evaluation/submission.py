"""Test-server submissions: predictions in the PASCAL VOC evaluation server's layout.

The server takes a tar.gz holding `results/VOC2012/Segmentation/comp6_test_cls/<id>.png`
(comp6: segmentation trained with data beyond VOC's own), one palette PNG per test image, at
the image's size, with class ids 0-20 as pixel values.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

from datasets.files import voc_palette

VOC_RESULTS_DIR = "results/VOC2012/Segmentation/comp6_test_cls"
SUBMISSION_FORMATS = ("voc",)


def submission_png(root: Path, name: str) -> Path:
    """Where the PNG of image `name` goes under a submission folder `root`."""
    return Path(root) / VOC_RESULTS_DIR / f"{name}.png"


def pack_submission(root: Path, archive: Path, names: list[str]) -> Path:
    """tar.gz of the PNGs of `names` under `root` (atomic: a temp file renamed at the end)."""
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for name in names:
                tar.add(submission_png(root, name), arcname=f"{VOC_RESULTS_DIR}/{name}.png")
        os.replace(tmp, archive)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return archive


def verify_submission(
    archive: Path, sizes: Mapping[str, tuple[int, int]], num_classes: int = 21
) -> list[str]:
    """Problems of `archive` against the expected ids and (width, height) sizes; [] if none.

    Checks: exactly one PNG per id in the results folder and nothing else, each a palette
    PNG with the VOC palette, at its image's size, with values < num_classes.
    """
    problems: list[str] = []
    seen: set[str] = set()
    palette = voc_palette()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            folder, _, file = member.name.rpartition("/")
            name = file[:-4] if file.endswith(".png") else None
            if folder != VOC_RESULTS_DIR or name is None or name not in sizes:
                problems.append(f"unexpected entry {member.name}")
                continue
            seen.add(name)
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                used = 3 * num_classes  # the colours of the class ids
                if img.mode != "P" or (img.getpalette() or [])[:used] != palette[:used]:
                    problems.append(f"{member.name}: not a VOC palette PNG (mode {img.mode})")
                if img.size != tuple(sizes[name]):
                    problems.append(f"{member.name}: size {img.size}, image is {sizes[name]}")
                values = np.unique(np.asarray(img))
                if values.size and values.max() >= num_classes:
                    problems.append(
                        f"{member.name}: values {values.tolist()} outside 0..{num_classes - 1}"
                    )
    missing = sorted(set(sizes) - seen)
    if missing:
        problems.append(f"{len(missing)} image(s) without a prediction: {missing[:5]}")
    return problems
