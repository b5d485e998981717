"""PAR (S2.4) against a naive per-pixel numpy implementation, plus closed-form properties."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toco.method.par import PAR

RASTER = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def naive_affinity(img: np.ndarray, dilations, w1: float, w2: float) -> np.ndarray:
    """A (B, N, H, W) with explicit loops over pixels and neighbours."""
    b_, c_, h_, w_ = img.shape
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in RASTER]
    dist = np.array([math.sqrt(oy * oy + ox * ox) for oy, ox in offs])
    p = -((dist / (dist.std(ddof=1) + 1e-8) / w1) ** 2)
    p_soft = np.exp(p) / np.exp(p).sum()
    aff = np.zeros((b_, len(offs), h_, w_))
    for b in range(b_):
        for y in range(h_):
            for x in range(w_):
                vals = np.array(
                    [
                        [
                            img[b, c, min(max(y + oy, 0), h_ - 1), min(max(x + ox, 0), w_ - 1)]
                            for oy, ox in offs
                        ]
                        for c in range(c_)
                    ]
                )  # (3, N)
                std = vals.std(axis=1, ddof=1)
                a = -((np.abs(vals - img[b, :, y, x][:, None]) / (std[:, None] + 1e-8) / w1) ** 2)
                a = a.mean(axis=0)
                aff[b, :, y, x] = np.exp(a - a.max()) / np.exp(a - a.max()).sum() + w2 * p_soft
    return aff


def naive_par(img: np.ndarray, masks: np.ndarray, num_iter: int, dilations, w1=0.3, w2=0.01):
    aff = naive_affinity(img, dilations, w1, w2)
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in RASTER]
    b_, k_, h_, w_ = masks.shape
    m = masks.copy()
    for _ in range(num_iter):
        new = np.zeros_like(m)
        for b in range(b_):
            for y in range(h_):
                for x in range(w_):
                    for n, (oy, ox) in enumerate(offs):
                        yy, xx = min(max(y + oy, 0), h_ - 1), min(max(x + ox, 0), w_ - 1)
                        new[b, :, y, x] += aff[b, n, y, x] * m[b, :, yy, xx]
        m = new
    return m


@pytest.mark.parametrize("dilations", [(1, 2), (1, 3, 13)])
def test_par_matches_naive_per_pixel_implementation(dilations):
    torch.manual_seed(0)
    img = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    masks = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    par = PAR(num_iter=2, dilations=dilations)
    out = par(img, masks)
    ref = naive_par(img.numpy(), masks.numpy(), 2, dilations)
    assert out.shape == (2, 3, 9, 11) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)
    aff = par.affinity(img)
    np.testing.assert_allclose(
        aff.numpy(), naive_affinity(img.numpy(), dilations, 0.3, 0.01), rtol=1e-10
    )


def test_par_fp32_matches_float64():
    torch.manual_seed(1)
    img = torch.rand(2, 3, 16, 20)
    masks = torch.rand(2, 4, 16, 20)
    par = PAR(num_iter=3)
    out = par(img, masks)
    ref = par(img.double(), masks.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_positional_softmax_matches_spec_numbers():
    par = PAR()
    pos = par.pos_weight
    assert pos.shape == (48,)
    # Spec 2.4: ~0.0683 per diagonal and ~0.0765 per axial neighbour at d = 1; 0.579 in total.
    diag = [0, 2, 5, 7]
    axial = [1, 3, 4, 6]
    assert pos[diag].numpy() == pytest.approx([0.0683] * 4, abs=1e-4)
    assert pos[axial].numpy() == pytest.approx([0.0765] * 4, abs=1e-4)
    assert float(pos[:8].sum()) == pytest.approx(0.579, abs=1e-3)
    assert float(pos.sum()) == pytest.approx(1.0, abs=1e-12)


def test_constant_image_gives_uniform_colour_affinity():
    par = PAR(num_iter=1, dilations=(1, 2, 4))
    img = torch.full((1, 3, 6, 7), 0.4, dtype=torch.float64)
    aff = par.affinity(img)
    colour = aff - 0.01 * par.pos_weight.view(1, -1, 1, 1)
    torch.testing.assert_close(colour, torch.full_like(colour, 1 / 24))
    torch.testing.assert_close(aff.sum(1), torch.full((1, 6, 7), 1.01, dtype=torch.float64))


def test_constant_masks_scale_by_one_plus_w2_per_iteration():
    torch.manual_seed(2)
    img = torch.rand(2, 3, 12, 10, dtype=torch.float64)
    masks = torch.full((2, 5, 12, 10), 0.3, dtype=torch.float64)
    out = PAR(num_iter=4)(img, masks)
    torch.testing.assert_close(out, torch.full_like(out, 0.3 * 1.01**4))


def test_masks_resized_bilinear_align_corners():
    torch.manual_seed(3)
    img = torch.rand(1, 3, 12, 16, dtype=torch.float64)
    small = torch.rand(1, 2, 6, 8, dtype=torch.float64)
    par = PAR(num_iter=2, dilations=(1, 2))
    big = F.interpolate(small, size=(12, 16), mode="bilinear", align_corners=True)
    torch.testing.assert_close(par(img, small), par(img, big))


def test_sharp_edge_blocks_propagation():
    # Left half dark, right half bright: a mask that is 1 on the left must barely leak right.
    img = torch.zeros(1, 3, 8, 16)
    img[..., 8:] = 1.0
    img += 0.01 * torch.rand(1, 3, 8, 16, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(1, 1, 8, 16)
    masks[..., :8] = 1.0
    out = PAR(num_iter=5, dilations=(1, 2))(img, masks)
    assert out[..., :6].min() > 0.9
    assert out[..., 10:].max() < 0.05


def test_par_under_autocast_returns_fp32():
    torch.manual_seed(4)
    img = torch.rand(1, 3, 10, 10)
    masks = torch.rand(1, 2, 10, 10)
    par = PAR(num_iter=2, dilations=(1, 2))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = par(img.bfloat16(), masks.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, par(img.bfloat16().float(), masks.bfloat16().float()))
