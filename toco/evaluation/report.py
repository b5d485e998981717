"""A static HTML report of an evaluation: per-class IoU chart and the worst / best images.

The page is one `index.html` with an inline SVG chart and PNG files under `images/`; it needs no
server (open it from disk). Each listed image shows the input, the ground truth, the CAM
heat-map (max over the image's classes), the pseudo label of the training rule and the
evaluated prediction, side by side.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from datasets.files import save_palette_png, write_bytes_atomic

PANELS = ("input", "ground truth", "CAM", "pseudo label", "prediction")
BAR_W, ROW_H, LABEL_W = 320, 16, 110


def image_score(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """Per-image mean IoU over the classes in the ground truth or the prediction (255 ignored).

    An empty union (all ignored) scores NaN, which ranks neither worst nor best.
    """
    keep = gt < num_classes
    p, g = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
    p = np.where(p < num_classes, p, num_classes)  # an uncertain prediction matches nothing
    hist = np.bincount(g * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    hist = hist.reshape(num_classes, num_classes + 1)
    tp = np.diag(hist[:, :num_classes])
    union = hist.sum(1) + hist[:, :num_classes].sum(0) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean() * 100) if present.any() else math.nan


def pick_extremes(
    scores: Sequence[tuple[int, str, float]], k: int
) -> tuple[list[tuple[int, str, float]], list[tuple[int, str, float]]]:
    """(k worst, k best) of (index, name, score), NaN scores left out, ties by name."""
    valid = sorted((s for s in scores if not math.isnan(s[2])), key=lambda s: (s[2], s[1]))
    worst = valid[:k]
    best = [s for s in reversed(valid) if s not in worst][:k]
    return worst, best


def _bar_chart(class_names: Sequence[str], iou: Sequence[float]) -> str:
    rows = []
    for i, (name, value) in enumerate(zip(class_names, iou)):
        y = i * ROW_H
        label = html.escape(name)
        rows.append(f'<text x="{LABEL_W - 4}" y="{y + 12}" text-anchor="end">{label}</text>')
        if math.isnan(value):
            rows.append(f'<text x="{LABEL_W + 4}" y="{y + 12}" class="na">no ground truth</text>')
            continue
        width = max(value, 0.0) * BAR_W
        rows.append(
            f'<rect class="bar" x="{LABEL_W}" y="{y + 2}" width="{width:.1f}" '
            f'height="{ROW_H - 4}"><title>{label}: {value * 100:.2f}</title></rect>'
        )
        rows.append(f'<text x="{LABEL_W + width + 4:.1f}" y="{y + 12}">{value * 100:.1f}</text>')
    height = ROW_H * len(class_names)
    return (
        f'<svg id="iou-chart" xmlns="http://www.w3.org/2000/svg" width="{LABEL_W + BAR_W + 50}"'
        f' height="{height}" font-size="11" font-family="sans-serif">{"".join(rows)}</svg>'
    )


def _save_panel(data: np.ndarray, path: Path) -> None:
    if data.ndim == 2:  # a label map: palette PNG (255 = uncertain / ignored shows cream)
        save_palette_png(data.astype(np.uint8), path)
    else:
        Image.fromarray(data).save(path)


def write_report(
    out_dir: Path,
    title: str,
    summary: dict[str, Any],
    class_names: Sequence[str],
    iou: Sequence[float],
    sections: dict[str, list[dict[str, Any]]],
) -> Path:
    """Write `out_dir/index.html` and `out_dir/images/*.png`; returns the page's path.

    sections: heading -> rows {"name", "score", "panels": {panel: array}}, where a panel is an
    (H, W, 3) uint8 picture or an (H, W) label map.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    blocks = []
    for heading, rows in sections.items():
        items = []
        for row in rows:
            cells = []
            for panel in PANELS:
                if panel not in row["panels"]:
                    continue
                slug = panel.replace(" ", "_")
                rel = f"images/{row['name']}_{slug}.png"
                _save_panel(row["panels"][panel], out_dir / rel)
                cells.append(
                    f'<figure><img src="{html.escape(rel)}" alt="{panel}">'
                    f"<figcaption>{panel}</figcaption></figure>"
                )
            items.append(
                f'<div class="row"><h3>{html.escape(row["name"])} '
                f"(image mIoU {row['score']:.1f})</h3>{''.join(cells)}</div>"
            )
        blocks.append(f"<h2>{html.escape(heading)}</h2>{''.join(items) or '<p>none</p>'}")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.bar {{ fill: #4a7fb5; }} .na {{ fill: #999; }}
figure {{ display: inline-block; margin: 0 6px 6px 0; }}
figure img {{ width: 200px; height: auto; image-rendering: pixelated; }}
figcaption {{ font-size: 11px; color: #555; }}
pre {{ background: #f4f4f4; padding: 0.6em; font-size: 11px; overflow-x: auto; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<pre>{html.escape(json.dumps(summary, indent=1))}</pre>
<h2>Per-class IoU (%)</h2>
{_bar_chart(class_names, iou)}
{"".join(blocks)}
</body></html>
"""
    index = out_dir / "index.html"
    write_bytes_atomic(index, page.encode())
    return index
