"""predict.py's work: predict a collection of image files and write one set of files each.

    OUT/masks/<name>.png        index PNG in the VOC palette, the image's displayed size
    OUT/overlays/<name>.jpg     the image with the mask blended in, a legend of its classes below
    OUT/cams/<name>/<k>-<class>.png   with --cams: the CAM of each present class over the image
    OUT/predictions.jsonl       one JSON object per input, in input order

Every file is written atomically. An input that cannot be read is reported once, by name, and
skipped (its line in predictions.jsonl carries the error instead of classes).
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from toco.atomic import write_bytes_atomic
from toco.errors import UserError, storage_error
from toco.images import read_image
from toco.predict.inputs import InputImage, collect_inputs

OVERLAY_ALPHA = 0.5
CAM_ALPHA = 0.5
MIN_LEGEND_WIDTH = 240


@dataclass
class PredictRequest:
    """What predict.py was asked to do (see `python predict.py --help`)."""

    model: str
    inputs: list[str]
    output: str
    lists: list[str] = field(default_factory=list)
    batch_size: int = 4
    workers: int = 2
    device: str = "auto"
    protocol: str = "train-val"
    cams: bool = False
    overlays: bool = True
    strict: bool = False

    def check(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise UserError(f"--output {self.output} is a file; give a folder to write into")
        if not self.inputs and not self.lists:
            raise UserError("no inputs: give image files, folders, @list.txt or --list FILE")


@dataclass
class Summary:
    """What a run did: records in input order and the inputs that could not be read."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def written(self) -> int:
        return len(self.records) - len(self.failed)


def run_prediction(req: PredictRequest) -> Summary:
    """Predict every input; raises UserError when none could be read (or, with --strict,
    when any could not), after writing what could be predicted."""
    from toco.predict.segmenter import load_segmenter

    req.check()
    out = Path(req.output)
    inputs = collect_inputs(req.inputs, req.lists, exclude=out)
    segmenter = load_segmenter(req.model, device=req.device, protocol=req.protocol)
    summary = Summary()
    try:
        try:
            _predict_all(segmenter, inputs, out, req, summary)
        finally:  # also on Ctrl-C: the list then covers every finished batch
            if summary.records:
                payload = "".join(json.dumps(r) + "\n" for r in summary.records).encode()
                write_bytes_atomic(out / "predictions.jsonl", payload)
    except OSError as err:
        raise storage_error(err, "the files written before it are whole") or err from None
    print(
        f"wrote {summary.written} prediction(s) to {out}"
        + (f"; skipped {len(summary.failed)} unreadable input(s)" if summary.failed else "")
    )
    if summary.written == 0:
        raise UserError(f"none of the {len(inputs)} input(s) could be read")
    if req.strict and summary.failed:
        raise UserError(
            f"{len(summary.failed)} of {len(inputs)} input(s) could not be read "
            f"(--strict): {summary.failed[0]}" + (" and more" if len(summary.failed) > 1 else "")
        )
    return summary


@dataclass
class _Read:
    """One input after reading: its pixels, or why it could not be read."""

    item: InputImage
    image: np.ndarray | None
    error: str | None
    seconds: float


def _read(item: InputImage) -> _Read:
    t0 = time.perf_counter()
    try:
        return _Read(item, read_image(item.path), None, time.perf_counter() - t0)
    except UserError as err:
        return _Read(item, None, str(err), time.perf_counter() - t0)


def _predict_all(
    segmenter, inputs: Sequence[InputImage], out: Path, req: PredictRequest, summary: Summary
) -> None:
    """Batch by batch; the next batch is decoded by `req.workers` threads while the model
    runs on this one (decoding large JPEGs costs as much as a small model's pass)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    batches = [inputs[i : i + req.batch_size] for i in range(0, len(inputs), req.batch_size)]
    bar = tqdm(
        total=len(inputs),
        desc="predict",
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None,
    )
    with ThreadPoolExecutor(max_workers=req.workers) as pool:
        try:
            pending = [pool.submit(_read, item) for item in batches[0]]
            for index in range(len(batches)):
                reads = [f.result() for f in pending]
                pending = (
                    [pool.submit(_read, item) for item in batches[index + 1]]
                    if index + 1 < len(batches)
                    else []
                )
                summary.records += _predict_batch(segmenter, reads, out, req, summary, bar)
                bar.update(len(reads))
        finally:
            for future in pending:
                future.cancel()
            bar.close()


def _predict_batch(
    segmenter, reads: list[_Read], out: Path, req: PredictRequest, summary: Summary, bar
) -> list[dict[str, Any]]:
    """The records of one batch, in input order, failures included."""
    for r in reads:
        if r.error is not None:
            bar.write(f"skipped: {r.error}", file=sys.stderr)
            summary.failed.append(str(r.item.path))
    good = [r for r in reads if r.image is not None]
    records = {
        id(r): {"path": str(r.item.path), "error": r.error} for r in reads if r.image is None
    }
    if good:
        t0 = time.perf_counter()
        preds = segmenter.predict_arrays([r.image for r in good], cam=req.cams)
        shared = (time.perf_counter() - t0) / len(good)
        for r, pred in zip(good, preds):
            t1 = time.perf_counter()
            record = write_outputs(out, r.item, r.image, pred, segmenter.class_names, req)
            record["seconds"] = round(r.seconds + shared + time.perf_counter() - t1, 4)
            records[id(r)] = record
    return [records[id(r)] for r in reads]


def write_outputs(
    out: Path,
    item: InputImage,
    image: np.ndarray,
    pred,
    class_names: Sequence[str],
    req: PredictRequest,
) -> dict[str, Any]:
    """Write one image's files; returns its predictions.jsonl record (without the time)."""
    from datasets.files import palette_png_bytes

    mask_file = Path("masks") / f"{item.name}.png"
    write_bytes_atomic(out / mask_file, palette_png_bytes(pred.mask))
    record: dict[str, Any] = {"path": str(item.path), "mask": mask_file.as_posix()}
    if req.overlays:
        overlay_file = Path("overlays") / f"{item.name}.jpg"
        write_bytes_atomic(
            out / overlay_file, _jpeg(overlay_picture(image, pred.mask, class_names))
        )
        record["overlay"] = overlay_file.as_posix()
    counts = np.bincount(pred.mask.ravel(), minlength=len(class_names))
    present = [k for k in np.flatnonzero(counts) if k != 0]
    if req.cams and pred.cam is not None:
        record["cams"] = {}
        for k in present:
            cam_file = Path("cams") / item.name / f"{k:02d}-{_safe(class_names[k])}.png"
            write_bytes_atomic(out / cam_file, _png(cam_picture(image, pred.cam[k - 1])))
            record["cams"][class_names[k]] = cam_file.as_posix()
    record.update(
        {
            "width": pred.size[0],
            "height": pred.size[1],
            "classes": [
                {
                    "name": class_names[k],
                    "index": int(k),
                    "score": round(pred.scores[class_names[k]], 6),
                    "area": round(float(counts[k]) / pred.mask.size, 6),
                }
                for k in present
            ],
            "scores": {name: round(score, 6) for name, score in pred.scores.items()},
        }
    )
    return record


def overlay_picture(image: np.ndarray, mask: np.ndarray, class_names: Sequence[str]) -> Image.Image:
    """The image with the mask's classes blended in and a legend of them underneath (the
    background swatch alone when no foreground class is present)."""
    from toco.visualize import legend, overlay_mask

    picture = Image.fromarray(overlay_mask(image, mask, OVERLAY_ALPHA))
    present = [int(k) for k in np.unique(mask) if 0 < k < len(class_names)] or [0]
    strip = legend(class_names, present, width=max(picture.width, MIN_LEGEND_WIDTH))
    canvas = Image.new("RGB", (strip.width, picture.height + strip.height), "white")
    canvas.paste(picture, (0, 0))
    canvas.paste(strip, (0, picture.height))
    return canvas


def cam_picture(image: np.ndarray, cam: np.ndarray) -> Image.Image:
    """One class's CAM as a heat-map blended over the image."""
    from toco.visualize import blend, heatmap

    return Image.fromarray(blend(image, heatmap(cam), CAM_ALPHA))


def _jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _safe(name: str) -> str:
    """A class name usable as a file name on every system."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"
