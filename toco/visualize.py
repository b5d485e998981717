"""Pictures of results: class colours, heat-maps, overlays, legends and labelled grids.

Plain numpy + PIL (no matplotlib). Label maps use the VOC palette everywhere, so a colour means
the same class in a run's preview, an evaluation report, a predicted mask PNG and an overlay;
255 (ignored / uncertain) is drawn in VOC's cream boundary colour.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from datasets.files import voc_palette

IGNORE = 255
CELL_PAD = 4


def palette_colors() -> np.ndarray:
    """(256, 3) uint8: the colour of every label value (VOC colour map; 255 is cream)."""
    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8 RGB in the palette."""
    return palette_colors()[np.asarray(mask, dtype=np.uint8)]


def heatmap(cam: torch.Tensor | np.ndarray) -> np.ndarray:
    """(H, W) scores in [0, 1] -> (H, W, 3) uint8 'jet-like' colours (blue 0 ... red 1)."""
    x = np.clip(cam.float().cpu().numpy() if isinstance(cam, torch.Tensor) else cam, 0, 1)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def blend(
    image: np.ndarray, overlay: np.ndarray, alpha: float, where: Optional[np.ndarray] = None
) -> np.ndarray:
    """(1 - alpha) * image + alpha * overlay, only where `where` is true (default: everywhere)."""
    out = image.astype(np.float32)
    mixed = (1 - alpha) * out + alpha * overlay.astype(np.float32)
    if where is None:
        out = mixed
    else:
        out[where] = mixed[where]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the class colours of `mask` blended over its foreground (0 and 255 kept)."""
    foreground = (mask != 0) & (mask != IGNORE)
    return blend(image, colorize(mask), alpha, foreground)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font())
    return right - left, bottom - top


def legend(
    class_names: Sequence[str], labels: Optional[Sequence[int]] = None, width: int = 600
) -> Image.Image:
    """A strip of colour swatches with class names, wrapped to `width` pixels.

    labels: the label values to show (default: every class); 255 may be included ("ignore").
    """
    labels = list(range(len(class_names))) if labels is None else list(labels)
    colors = palette_colors()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(12, _text_size(probe, "Ag")[1] + 6)
    items, x, y = [], CELL_PAD, CELL_PAD
    for value in labels:
        name = "ignore" if value == IGNORE else class_names[value]
        w = line_h + 4 + _text_size(probe, name)[0] + 12
        if x + w > width and x > CELL_PAD:
            x, y = CELL_PAD, y + line_h
        items.append((x, y, value, name))
        x += w
    strip = Image.new("RGB", (width, y + line_h + CELL_PAD), "white")
    draw = ImageDraw.Draw(strip)
    for x, y, value, name in items:
        draw.rectangle(
            [x, y + 1, x + line_h - 4, y + line_h - 3],
            fill=tuple(int(c) for c in colors[value]),
            outline=(80, 80, 80),
        )
        draw.text((x + line_h, y + 1), name, fill="black", font=_font())
    return strip


def grid(
    rows: Sequence[Sequence[np.ndarray]],
    columns: Sequence[str],
    row_titles: Sequence[str] = (),
    title: str = "",
    cell: int = 128,
) -> Image.Image:
    """A labelled table of pictures: one row per sample, one column per panel.

    Every panel is an (H, W, 3) uint8 picture or an (H, W) label map (coloured with the
    palette); each is resized to `cell` pixels wide (label maps and small pictures with nearest
    neighbours, so pixels stay visible).
    """
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = _text_size(probe, "Ag")[1] + 6
    title_h = text_h if title else 0
    row_label_w = max((_text_size(probe, t)[0] for t in row_titles), default=0)
    row_label_w = row_label_w + 2 * CELL_PAD if row_titles else 0
    cells = [[_cell(panel, cell) for panel in row] for row in rows]
    heights = [max(c.height for c in row) for row in cells]
    width = row_label_w + len(columns) * (cell + CELL_PAD) + CELL_PAD
    height = title_h + text_h + sum(h + CELL_PAD for h in heights) + CELL_PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((CELL_PAD, 2), title, fill="black", font=_font())
    for j, name in enumerate(columns):
        x = row_label_w + CELL_PAD + j * (cell + CELL_PAD)
        draw.text((x, title_h + 2), name, fill="black", font=_font())
    y = title_h + text_h
    for i, row in enumerate(cells):
        if i < len(row_titles):
            draw.text(
                (CELL_PAD, y + heights[i] // 2 - text_h // 2),
                row_titles[i],
                fill="black",
                font=_font(),
            )
        for j, picture in enumerate(row):
            canvas.paste(picture, (row_label_w + CELL_PAD + j * (cell + CELL_PAD), y))
        y += heights[i] + CELL_PAD
    return canvas


def stack(pictures: Sequence[Image.Image]) -> Image.Image:
    """The pictures one under the other, left-aligned, on white."""
    canvas = Image.new(
        "RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white"
    )
    y = 0
    for picture in pictures:
        canvas.paste(picture, (0, y))
        y += picture.height
    return canvas


def _cell(panel: np.ndarray, width: int) -> Image.Image:
    picture = Image.fromarray(colorize(panel) if panel.ndim == 2 else panel)
    height = max(1, round(picture.height * width / picture.width))
    smooth = panel.ndim == 3 and picture.width > width
    return picture.resize((width, height), Image.BILINEAR if smooth else Image.NEAREST)
