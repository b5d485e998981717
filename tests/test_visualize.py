"""Pictures: palette colours, heat-map colours, blending, the preview's image choice and grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from toco.evaluation.preview import COLUMNS, pick_images, write_preview
from toco.visualize import blend, colorize, grid, heatmap, legend, overlay_mask, palette_colors


def test_palette_is_the_voc_colour_map():
    colors = palette_colors()
    # VOC's first entries, written out by hand from the bit-interleaving rule
    assert colors[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert colors[255].tolist() == [224, 224, 192]  # the cream boundary / ignore colour
    assert colorize(np.array([[0, 2], [255, 1]], np.uint8)).tolist() == [
        [[0, 0, 0], [0, 128, 0]],
        [[224, 224, 192], [128, 0, 0]],
    ]


@pytest.mark.parametrize(
    "value, rgb",
    [(0.0, (0, 0, 127)), (0.25, (0, 127, 255)), (0.5, (127, 255, 127)), (1.0, (127, 0, 0))],
)
def test_heatmap_colours(value, rgb):
    # r = clip(1.5 - |4x - 3|), g = clip(1.5 - |4x - 2|), b = clip(1.5 - |4x - 1|), times 255
    assert tuple(heatmap(np.full((1, 1), value))[0, 0]) == rgb


def test_blend_and_overlay():
    image = np.full((2, 2, 3), 100, np.uint8)
    top = np.full((2, 2, 3), 200, np.uint8)
    assert (blend(image, top, 0.25) == 125).all()
    mask = np.array([[0, 1], [255, 2]], np.uint8)
    out = overlay_mask(image, mask, alpha=0.5)
    assert out[0, 0].tolist() == [100, 100, 100] and out[1, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [114, 50, 50]  # (100 + 128) / 2 = 114, (100 + 0) / 2 = 50


def test_pick_images_covers_the_classes_first():
    labels = [[1], [1], [2, 3], [1, 4], [5], []]
    # most new classes first (ties: split order), then the first images not yet picked
    assert pick_images(labels, 4) == [2, 3, 4, 0]
    assert pick_images(labels, 10) == [2, 3, 4, 0, 1, 5]
    assert pick_images([], 3) == []


def test_preview_has_five_labelled_columns_and_a_legend(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        [
            rng.integers(0, 255, (40, 60, 3), dtype=np.uint8),
            np.full((40, 60), k, np.uint8),
            rng.integers(0, 255, (40, 60, 3), dtype=np.uint8),
            np.full((40, 60), 255, np.uint8),
            np.full((40, 60), k, np.uint8),
        ]
        for k in (1, 2)
    ]
    path = write_preview(
        tmp_path / "preview.png", rows, ["a", "b"], ["background", "cat", "dog"], "demo"
    )
    picture = np.asarray(Image.open(path).convert("RGB"))
    body = grid(rows, COLUMNS, row_titles=["a", "b"], title="demo")
    assert picture.shape[1] == body.width and picture.shape[0] > body.height  # legend below
    key = np.asarray(legend(["background", "cat", "dog"], [1, 2, 255], width=body.width))
    assert (picture[body.height :] == key).all()
    # the ground truth of row 1 (class 1, dark red) fills its cell
    cell_colours = {tuple(c) for c in picture[: body.height].reshape(-1, 3)}
    assert (128, 0, 0) in cell_colours and (0, 128, 0) in cell_colours
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
