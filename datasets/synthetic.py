"""A small deterministic synthetic dataset in VOC layout, so the VOC loader serves it unchanged.

Six object classes, each with its own shape AND texture/colour family (hue, phase, scale jitter
per instance, so colour is a strong but imperfect cue), on cluttered backgrounds with distractor
strokes and blobs labelled background. Like VOC's boats on water, every 'boat' floats on a wavy
water band (labelled background) that also appears in ~15% of boat-free images: the context bias
that weakly-supervised CAMs are known to pick up.

Each image is drawn from its own ``numpy.random.Generator`` seeded by (seed, split, index), so the
output is byte-identical for the same parameters. Generation writes into a temporary sibling
folder and renames it into place, with a ``.complete`` marker written last, so an interrupted run
never leaves a tree that looks complete.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from datasets.files import save_palette_png
from toco.errors import ConfigError, DataError

GENERATOR_VERSION = 1
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "background", "disc", "square", "triangle", "ring", "cross", "boat",
)  # fmt: skip
BOAT = SYNTHETIC_CLASSES.index("boat")
WATER_WITHOUT_BOAT_P = 0.15
SIZE_JITTER = (0.8, 1.2)  # each image side is the base side times U(SIZE_JITTER)
OBJECT_SIZE = (0.15, 0.45)  # object extent as a fraction of the image's shorter side
MARKER = ".complete"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SyntheticParams:
    """Everything the output depends on (besides GENERATOR_VERSION)."""

    num_train: int = 600
    num_val: int = 120
    image_size: tuple[int, int] = (160, 160)  # base (height, width)
    seed: int = 0

    def __post_init__(self) -> None:
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "image_size", size)
        if len(size) != 2 or min(size) < 32:
            raise ConfigError(f"synthetic image_size must be (height, width) >= 32, got {size}")
        if self.num_train < 1 or self.num_val < 1:
            raise ConfigError("synthetic num_train and num_val must be at least 1")
        if self.seed < 0:
            raise ConfigError(f"synthetic seed must be non-negative, got {self.seed}")

    def marker(self) -> dict[str, Any]:
        params = {**asdict(self), "image_size": list(self.image_size)}
        return {"generator": "toco-synthetic", "version": GENERATOR_VERSION, "params": params}

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.marker(), sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------
# Drawing primitives (vectorised over a coordinate grid)


@dataclass(frozen=True)
class Grid:
    """Pixel coordinates of an image, or of a window of it (then ``window`` locates it)."""

    h: int  # size of the whole image
    w: int
    yy: np.ndarray  # float32 row coordinate of each pixel of the window
    xx: np.ndarray
    window: tuple[slice, slice]

    @classmethod
    def of(cls, h: int, w: int) -> Grid:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        return cls(h, w, yy, xx, (slice(0, h), slice(0, w)))

    def around(self, cx: float, cy: float, radius: float) -> Grid:
        """The window of the image within ``radius`` (chessboard) of (cx, cy).

        Drawing only there keeps per-object cost proportional to the object's area.
        """
        y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, self.h)
        x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, self.w)
        y0, x0 = min(y0, y1), min(x0, x1)
        window = (slice(y0, y1), slice(x0, x1))
        return Grid(self.h, self.w, self.yy[window], self.xx[window], window)

    def local(self, cx: float, cy: float, angle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates in a frame centred on (cx, cy) and rotated by ``angle``."""
        dx, dy = self.xx - cx, self.yy - cy
        c, s = np.cos(angle), np.sin(angle)
        return dx * c + dy * s, -dx * s + dy * c


def hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t[..., None]


def _linear_weights(n: int, cells: int) -> np.ndarray:
    """(n, cells + 1) matrix that linearly interpolates cells + 1 knots at n positions."""
    pos = np.linspace(0, cells, n, dtype=np.float32)
    return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(cells + 1, dtype=np.float32)))


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, std: float) -> np.ndarray:
    """Low-frequency noise: a coarse random grid, bilinearly upsampled (separably)."""
    coarse = rng.normal(0.0, std, size=(cells + 1, cells + 1)).astype(np.float32)
    return _linear_weights(h, cells) @ coarse @ _linear_weights(w, cells).T


def waves(coord: np.ndarray, period: float, phase: float) -> np.ndarray:
    """0..1 sinusoid along ``coord``."""
    return 0.5 + 0.5 * np.sin(2 * np.pi * coord / period + phase)


def boundary_band(label: np.ndarray) -> np.ndarray:
    """Pixels with an 8-neighbour of another label: a 2-px band (one px each side)."""
    h, w = label.shape
    padded = np.pad(label, 1, mode="edge")
    band = np.zeros((h, w), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            if (dy, dx) != (1, 1):
                band |= padded[dy : dy + h, dx : dx + w] != label
    return band


# (window of the image, bool mask over the window, float32 colour (..., 3) over the window)
Drawing = tuple[tuple[slice, slice], np.ndarray, np.ndarray]


def paint(img: np.ndarray, drawing: Drawing, label: np.ndarray | None = None, cls: int = 0):
    """Paint a drawing over ``img`` (and its class over ``label``); later paints win."""
    window, mask, colour = drawing
    img[window][mask] = colour[mask]
    if label is not None:
        label[window][mask] = cls


# --------------------------------------------------------------------------------------------
# Background, clutter and water


def background(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """Smooth random colour gradient plus low-contrast low-frequency noise."""
    base = rng.uniform()
    corners = [
        hsv(base + rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.45), rng.uniform(0.35, 0.9))
        for _ in range(4)
    ]
    fy = np.linspace(0, 1, grid.h, dtype=np.float32)[:, None, None]
    fx = np.linspace(0, 1, grid.w, dtype=np.float32)[:, None]
    top = corners[0] * (1 - fx) + corners[1] * fx  # (w, 3)
    bottom = corners[2] * (1 - fx) + corners[3] * fx
    img = top * (1 - fy) + bottom * fy
    return img + smooth_noise(rng, grid.h, grid.w, cells=6, std=8.0)[..., None]


def distractor(rng: np.random.Generator, grid: Grid) -> Drawing:
    """A stroke or an irregular blob in any colour: clutter that is NOT an object."""
    side = min(grid.h, grid.w)
    colour = hsv(rng.uniform(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.95))
    cx, cy = rng.uniform(0, grid.w), rng.uniform(0, grid.h)
    angle = rng.uniform(0, 2 * np.pi)
    if rng.uniform() < 0.5:
        half_length = rng.uniform(0.1, 0.3) * side
        width = rng.uniform(1.5, 4.0)
        sub = grid.around(cx, cy, half_length + width)
        u, v = sub.local(cx, cy, angle)
        # distance to a segment along u: clamp the projection, then measure
        du = u - np.clip(u, -half_length, half_length)
        mask = du**2 + v**2 <= (width / 2) ** 2
    else:
        a, b = rng.uniform(0.04, 0.12, size=2) * side
        sub = grid.around(cx, cy, 1.2 * max(a, b))
        u, v = sub.local(cx, cy, angle)
        wobble = 1 + 0.2 * np.sin(rng.integers(2, 6) * np.arctan2(v, u) + rng.uniform(0, 6.3))
        mask = (u / a) ** 2 + (v / b) ** 2 <= wobble**2
    shade = np.clip(1 - 0.15 * u / side, 0.7, 1.3)
    return sub.window, mask, colour * shade[..., None]


@dataclass(frozen=True)
class Water:
    """A wavy band below y = level + amp * sin(2 pi x / period + phase)."""

    level: float
    amp: float
    period: float
    phase: float

    @classmethod
    def sample(cls, rng: np.random.Generator, grid: Grid) -> Water:
        return cls(
            level=rng.uniform(0.6, 0.75) * grid.h,
            amp=rng.uniform(1.5, 4.0),
            period=rng.uniform(0.25, 0.6) * grid.w,
            phase=rng.uniform(0, 2 * np.pi),
        )

    def surface(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.level + self.amp * np.sin(2 * np.pi * np.asarray(x) / self.period + self.phase)

    def draw(self, rng: np.random.Generator, grid: Grid) -> Drawing:
        hue = 0.58 + rng.uniform(-0.02, 0.02)
        sat, val = rng.uniform(0.55, 0.8), rng.uniform(0.5, 0.7)
        deep, light = hsv(hue, sat, val), hsv(hue, sat - 0.2, min(val + 0.2, 1.0))
        wobble = 2.0 * np.sin(2 * np.pi * grid.xx / rng.uniform(12, 30) + rng.uniform(0, 6.3))
        ripples = waves(grid.yy + wobble, rng.uniform(4, 7), rng.uniform(0, 6.3))
        return grid.window, grid.yy >= self.surface(grid.xx), lerp(deep, light, ripples**2)

    def rows(self) -> dict[str, int]:
        """First row the band can reach and first row that is water at every column."""
        return {
            "top": int(np.floor(self.level - self.amp)),
            "full": int(np.ceil(self.level + self.amp)),
        }


# --------------------------------------------------------------------------------------------
# Objects: one function per class, each a distinct shape and texture family


def draw_disc(rng: np.random.Generator, grid: Grid, cx: float, cy: float, size: float) -> Drawing:
    """Red solid disc, shaded by an off-centre radial gradient."""
    r = size / 2
    grid = grid.around(cx, cy, r)
    u, v = grid.local(cx, cy)
    hue, sat = rng.uniform(-0.025, 0.025), rng.uniform(0.65, 0.9)
    light, dark = hsv(hue, sat, rng.uniform(0.85, 1.0)), hsv(hue, sat, rng.uniform(0.4, 0.6))
    spot = rng.uniform(0, 2 * np.pi)
    hx, hy = 0.35 * r * np.cos(spot), 0.35 * r * np.sin(spot)
    t = np.clip(np.hypot(u - hx, v - hy) / (1.3 * r), 0, 1)
    return grid.window, u**2 + v**2 <= r**2, lerp(light, dark, t)


def draw_square(rng: np.random.Generator, grid: Grid, cx: float, cy: float, size: float) -> Drawing:
    """Green rotated square with a checkerboard."""
    grid = grid.around(cx, cy, size / np.sqrt(2))
    u, v = grid.local(cx, cy, rng.uniform(0, np.pi / 2))
    hue, sat = 0.33 + rng.uniform(-0.03, 0.03), rng.uniform(0.5, 0.8)
    a, b = hsv(hue, sat, rng.uniform(0.75, 0.9)), hsv(hue, sat, rng.uniform(0.3, 0.5))
    cell = rng.uniform(0.12, 0.25) * size
    du, dv = rng.uniform(0, cell, size=2)
    checks = (np.floor((u + du) / cell) + np.floor((v + dv) / cell)) % 2
    mask = (np.abs(u) <= size / 2) & (np.abs(v) <= size / 2)
    return grid.window, mask, lerp(a, b, checks.astype(np.float32))


def draw_triangle(
    rng: np.random.Generator, grid: Grid, cx: float, cy: float, size: float
) -> Drawing:
    """Yellow equilateral triangle (side = size) with diagonal stripes."""
    grid = grid.around(cx, cy, size / np.sqrt(3))  # circumradius
    u, v = grid.local(cx, cy, rng.uniform(0, 2 * np.pi))
    inradius = size / (2 * np.sqrt(3))
    mask = np.ones(u.shape, dtype=bool)
    for k in range(3):  # intersection of three half-planes with normals 120 degrees apart
        theta = 2 * np.pi * k / 3
        mask &= u * np.cos(theta) + v * np.sin(theta) <= inradius
    hue, sat = 0.15 + rng.uniform(-0.02, 0.02), rng.uniform(0.7, 0.95)
    a, b = hsv(hue, sat, rng.uniform(0.88, 1.0)), hsv(hue - 0.03, sat, rng.uniform(0.45, 0.6))
    beta = rng.uniform(0, np.pi)
    stripes = waves(u * np.cos(beta) + v * np.sin(beta), rng.uniform(4, 8), rng.uniform(0, 6.3))
    return grid.window, mask, lerp(a, b, (stripes > 0.5).astype(np.float32))


def draw_ring(rng: np.random.Generator, grid: Grid, cx: float, cy: float, size: float) -> Drawing:
    """Purple annulus with concentric bands."""
    grid = grid.around(cx, cy, size / 2)
    u, v = grid.local(cx, cy)
    d = np.hypot(u, v)
    outer = size / 2
    inner = outer * rng.uniform(0.45, 0.65)
    hue, sat = 0.8 + rng.uniform(-0.03, 0.03), rng.uniform(0.5, 0.8)
    a, b = hsv(hue, sat, rng.uniform(0.8, 0.95)), hsv(hue, sat, rng.uniform(0.35, 0.5))
    bands = waves(d, rng.uniform(3, 6), rng.uniform(0, 6.3))
    return grid.window, (d <= outer) & (d >= inner), lerp(a, b, bands)


def draw_cross(rng: np.random.Generator, grid: Grid, cx: float, cy: float, size: float) -> Drawing:
    """Teal plus sign with dark polka dots."""
    grid = grid.around(cx, cy, size / np.sqrt(2))
    u, v = grid.local(cx, cy, rng.uniform(0, np.pi / 2))
    arm = size * rng.uniform(0.12, 0.18)
    half = size / 2
    mask = ((np.abs(u) <= half) & (np.abs(v) <= arm)) | ((np.abs(v) <= half) & (np.abs(u) <= arm))
    hue, sat = 0.48 + rng.uniform(-0.025, 0.025), rng.uniform(0.5, 0.75)
    a, b = hsv(hue, sat, rng.uniform(0.75, 0.92)), hsv(hue + 0.05, sat, rng.uniform(0.2, 0.35))
    pitch = rng.uniform(4, 7)
    du, dv = rng.uniform(0, pitch, size=2)
    fu, fv = (u + du) % pitch - pitch / 2, (v + dv) % pitch - pitch / 2
    dots = (fu**2 + fv**2 <= (0.3 * pitch) ** 2).astype(np.float32)
    return grid.window, mask, lerp(a, b, dots)


def draw_boat(rng: np.random.Generator, grid: Grid, water: Water, size: float) -> Drawing:
    """Brown planked hull sitting in the water line, a mast and a pale sail."""
    cx = rng.uniform(size / 2, grid.w - size / 2)
    hull_h = 0.28 * size
    hull_top = float(water.surface(cx)) - 0.55 * hull_h
    # rows [hull_top - 0.7 size, hull_top + hull_h]; the sail reaches 0.55 size from cx
    grid = grid.around(cx, hull_top + (hull_h - 0.7 * size) / 2, 0.56 * size + 1)
    depth = (grid.yy - hull_top) / hull_h  # 0 at the deck, 1 at the keel
    top_half, keel_half = size / 2, size / 2 * rng.uniform(0.55, 0.75)
    half_width = top_half + (keel_half - top_half) * depth
    hull = (depth >= 0) & (depth <= 1) & (np.abs(grid.xx - cx) <= half_width)

    mast_x = cx + rng.uniform(-0.1, 0.1) * size
    mast_top = hull_top - 0.7 * size
    mast_half = max(0.8, 0.025 * size)
    mast = (np.abs(grid.xx - mast_x) <= mast_half) & (grid.yy >= mast_top) & (grid.yy < hull_top)

    side = 1.0 if rng.uniform() < 0.5 else -1.0
    sail_top, sail_bottom = mast_top + 0.05 * size, hull_top - 0.05 * size
    reach = rng.uniform(0.3, 0.45) * size * (grid.yy - sail_top) / (sail_bottom - sail_top)
    across = side * (grid.xx - mast_x)
    sail = (grid.yy >= sail_top) & (grid.yy <= sail_bottom) & (across > 0) & (across <= reach)

    hue = 0.07 + rng.uniform(-0.02, 0.02)
    plank_a = hsv(hue, rng.uniform(0.55, 0.75), rng.uniform(0.4, 0.55))
    plank_b = hsv(hue, rng.uniform(0.55, 0.75), rng.uniform(0.25, 0.35))
    planks = (waves(grid.yy, rng.uniform(3, 5), rng.uniform(0, 6.3)) > 0.5).astype(np.float32)
    colour = lerp(plank_a, plank_b, planks)
    colour[mast] = plank_b
    sail_colour = hsv(rng.uniform(), rng.uniform(0.0, 0.12), rng.uniform(0.85, 0.97))
    colour[sail] = sail_colour * (1 - 0.1 * (across[sail] / size))[:, None]
    return grid.window, hull | mast | sail, colour


SHAPES: dict[int, Callable[..., Drawing]] = {
    SYNTHETIC_CLASSES.index("disc"): draw_disc,
    SYNTHETIC_CLASSES.index("square"): draw_square,
    SYNTHETIC_CLASSES.index("triangle"): draw_triangle,
    SYNTHETIC_CLASSES.index("ring"): draw_ring,
    SYNTHETIC_CLASSES.index("cross"): draw_cross,
}


# --------------------------------------------------------------------------------------------
# One sample


@dataclass
class Sample:
    image: np.ndarray  # uint8 (h, w, 3)
    mask: np.ndarray  # uint8 (h, w): class ids, 255 on object boundaries
    meta: dict[str, Any]


def plan_objects(rng: np.random.Generator) -> list[int]:
    """1-3 objects from 1-2 classes, every chosen class at least once, in painting order."""
    num_object_classes = len(SYNTHETIC_CLASSES) - 1
    num_classes = int(rng.integers(1, 3))
    classes = [int(c) + 1 for c in rng.choice(num_object_classes, num_classes, replace=False)]
    num_objects = int(rng.integers(num_classes, 4))
    extra = [classes[int(rng.integers(num_classes))] for _ in range(num_objects - num_classes)]
    order = classes + extra
    return [order[i] for i in rng.permutation(len(order))]


def render_sample(rng: np.random.Generator, base_hw: tuple[int, int]) -> Sample:
    """Background → clutter → (water) → objects, later objects painted on top."""
    h = int(round(base_hw[0] * rng.uniform(*SIZE_JITTER)))
    w = int(round(base_hw[1] * rng.uniform(*SIZE_JITTER)))
    grid = Grid.of(h, w)
    img = background(rng, grid)
    for _ in range(int(rng.integers(2, 6))):
        paint(img, distractor(rng, grid))

    objects = plan_objects(rng)
    water = None
    if BOAT in objects or rng.uniform() < WATER_WITHOUT_BOAT_P:
        water = Water.sample(rng, grid)
        paint(img, water.draw(rng, grid))

    label = np.zeros((h, w), dtype=np.uint8)
    for cls in objects:
        size = rng.uniform(*OBJECT_SIZE) * min(h, w)
        if cls == BOAT:
            drawing = draw_boat(rng, grid, water, size)
        else:
            cx = rng.uniform(size / 2, w - size / 2)
            cy = rng.uniform(size / 2, h - size / 2)
            drawing = SHAPES[cls](rng, grid, cx, cy, size)
        paint(img, drawing, label, cls)
    label[boundary_band(label)] = 255

    img += 3.0 * rng.standard_normal(size=img.shape, dtype=np.float32)
    meta = {
        "size": [h, w],
        "classes": sorted(set(objects)),
        "water": water.rows() if water is not None else None,
    }
    return Sample(np.clip(img, 0, 255).astype(np.uint8), label, meta)


# --------------------------------------------------------------------------------------------
# The tree on disk


def read_marker(root: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_tree(folder: Path, params: SyntheticParams) -> None:
    """All files of the dataset into ``folder``; the marker goes last."""
    image_dir, mask_dir = folder / "JPEGImages", folder / "SegmentationClass"
    split_dir = folder / "ImageSets" / "Segmentation"
    for d in (image_dir, mask_dir, split_dir):
        d.mkdir(parents=True)
    meta: dict[str, Any] = {}
    counts = {"train": params.num_train, "val": params.num_val}
    for split_code, split in enumerate(SPLITS):
        names = []
        for index in range(counts[split]):
            name = f"{split}_{index:05d}"
            sample = render_sample(
                np.random.default_rng([params.seed, split_code, index]), params.image_size
            )
            Image.fromarray(sample.image).save(image_dir / f"{name}.jpg", quality=90)
            save_palette_png(sample.mask, mask_dir / f"{name}.png")
            meta[name] = sample.meta
            names.append(name)
        (split_dir / f"{split}.txt").write_text("\n".join(names) + "\n")
    info = {"classes": list(SYNTHETIC_CLASSES), "images": meta}
    (folder / "meta.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    (folder / MARKER).write_text(json.dumps(params.marker(), sort_keys=True))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_siblings(root: Path) -> None:
    """Leftovers of killed runs: temp folders whose process is gone."""
    for sibling in root.parent.glob(f".{root.name}.*-*"):
        pid = sibling.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(sibling, ignore_errors=True)


def _install(tmp: Path, root: Path, params: SyntheticParams) -> None:
    """Move the finished ``tmp`` to ``root``, replacing an out-of-date generated tree."""
    try:
        os.rename(tmp, root)  # atomic; succeeds when root is absent or an empty folder
        return
    except OSError:
        pass
    if read_marker(root) == params.marker():
        return  # a concurrent run (another rank) finished first
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    os.rename(root, old)
    os.rename(tmp, root)
    shutil.rmtree(old, ignore_errors=True)


def make_synthetic_voc(
    root: Path,
    num_train: int = 600,
    num_val: int = 120,
    image_size: tuple[int, int] | int = (160, 160),
    seed: int = 0,
) -> Path:
    """Generate the dataset at ``root`` unless a complete tree with these parameters is there.

    ``image_size`` is the base (height, width); each image's sides are jittered by U(0.8, 1.2).
    Refuses (DataError) to replace a non-empty folder that this generator did not write.
    """
    params = SyntheticParams(num_train, num_val, image_size, seed)
    root = Path(root)
    existing = read_marker(root)
    if existing == params.marker():
        return root
    if root.exists():
        generated = existing is not None and existing.get("generator") == "toco-synthetic"
        if not root.is_dir() or (not generated and any(root.iterdir())):
            raise DataError(f"{root} exists and is not a synthetic dataset; refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(root)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_tree(tmp, params)
        _install(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_synthetic(cache_root: Path, **params: Any) -> Path:
    """``cache_root/synthetic-v<version>-<hash of params>``, generated there if needed."""
    known = [f.name for f in fields(SyntheticParams)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"unknown synthetic dataset parameter(s) {unknown}; known: {known}")
    spec = SyntheticParams(**params)
    folder = Path(cache_root) / f"synthetic-v{GENERATOR_VERSION}-{spec.digest()}"
    return make_synthetic_voc(folder, **asdict(spec))
