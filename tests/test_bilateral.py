"""The bilateral filters of toco.method.bilateral against independent formulas.

- the exact filter against a literal double loop;
- the lattice against a scalar, dictionary-hashed implementation of the same algorithm, and (when
  installed) against pydensecrf's C++ lattice;
- the lattice against the exact filter within the stated bounds; gradients; the spatial blur.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from toco.method.bilateral import (
    LATTICE_REL_L2_ANY,
    LATTICE_REL_L2_NATURAL,
    PermutohedralLattice,
    bilateral_features,
    bilateral_filter,
    gaussian_blur,
    gaussian_filter_exact,
    pixel_grid,
)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These tests run many short sparse products, which slow down 5-10x when OpenMP's threads
    wait on an oversubscribed CPU (a shared CI or dev machine); one thread keeps them at a few
    seconds. Modules import this fixture to use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def natural_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, H, W) 0-255 float picture with photo-like statistics: a smooth backdrop, shaded
    discs of random colour and sensor noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([60 + 120 * x, 80 + 60 * y, 150 - 50 * x * y])
    for _ in range(5):
        cy, cx, r = torch.rand(3, generator=g) * torch.tensor([1, 1, 0.35]) + torch.tensor(
            [0, 0, 0.1]
        )
        colour = torch.rand(3, 1, 1, generator=g) * 255
        inside = ((y - cy) ** 2 + (x - cx) ** 2) < r**2
        img = torch.where(inside, colour * (1 + 0.3 * (y - cy)), img)
    img = img + 4 * torch.randn(img.shape, generator=g)
    return img.clamp(0, 255).round().unsqueeze(0)


def lattice_reference(feats: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Scalar Krähenbühl/Adams permutohedral filter, one pixel at a time with a dict as the hash
    table: (N, d) features, (N, C) values -> (N, C). Test oracle for tiny inputs only."""
    n_pix, d = feats.shape
    d1 = d + 1
    scale = [np.float32(math.sqrt(2 / 3) * d1 / math.sqrt((i + 1) * (i + 2))) for i in range(d)]
    table: dict[tuple[int, ...], int] = {}
    splats = []  # (pixel, lattice point, weight)
    for n in range(n_pix):
        el = [np.float32(0)] * d1
        acc = np.float32(0)
        for j in range(d, 0, -1):
            cf = np.float32(feats[n, j - 1]) * scale[j - 1]
            el[j] = acc - np.float32(j) * cf
            acc = acc + cf
        el[0] = acc
        rem0 = [float(np.round(e * np.float32(1 / d1))) * d1 for e in el]
        shift = int(round(sum(rem0) / d1))
        rank = [0] * d1
        for i in range(d1):
            for j in range(i + 1, d1):
                if el[i] - rem0[i] < el[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d1):
            rank[i] += shift
            if rank[i] < 0:
                rank[i] += d1
                rem0[i] += d1
            elif rank[i] > d:
                rank[i] -= d1
                rem0[i] -= d1
        bary = [0.0] * (d + 2)
        for i in range(d1):
            v = float(el[i] - rem0[i]) / d1
            bary[d - rank[i]] += v
            bary[d - rank[i] + 1] -= v
        bary[0] += 1 + bary[d1]
        for r in range(d1):
            key = tuple(int(rem0[i]) + (r if rank[i] <= d - r else r - d1) for i in range(d))
            splats.append((n, table.setdefault(key, len(table)), bary[r]))
    keys = list(table)
    lat = np.zeros((len(keys), vals.shape[1]))
    for n, k, wt in splats:
        lat[k] += wt * vals[n]
    for j in range(d1):
        new = lat.copy()
        for k, key in enumerate(keys):
            for sign in (1, -1):
                nb = tuple(key[i] + sign * ((d1 if i == j else 0) - 1) for i in range(d))
                if nb in table:
                    new[k] += 0.5 * lat[table[nb]]
        lat = new
    alpha = 1 / (1 + 2**-d)
    out = np.zeros_like(vals, dtype=np.float64)
    for n, k, wt in splats:
        out[n] += alpha * wt * lat[k]
    return out


def lattice_vs_exact(feats: torch.Tensor, values: torch.Tensor) -> tuple[float, float]:
    """(‖N_lat − N_exact‖ / ‖N_exact‖ with N = Kv / K1, least-squares scale of raw lattice sums
    to exact ones)."""
    both = torch.cat([values, torch.ones_like(values[:, :1])], dim=1)
    exact = gaussian_filter_exact(feats.double(), both)
    lat = PermutohedralLattice(feats)(both)
    n_exact, n_lat = exact[:, :-1] / exact[:, -1:], lat[:, :-1] / lat[:, -1:]
    rel = ((n_lat - n_exact).norm() / n_exact.norm()).item()
    scale = ((lat[:, :-1] * exact[:, :-1]).sum() / exact[:, :-1].square().sum()).item()
    return rel, scale


def test_exact_filter_is_the_double_sum():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    vals = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64)
    f = feats.flatten(2).numpy()
    v = vals.flatten(2).numpy()
    expect = np.zeros_like(v)
    for b in range(2):
        for i in range(20):
            for j in range(20):
                weight = math.exp(-0.5 * ((f[b, :, i] - f[b, :, j]) ** 2).sum())
                expect[b, :, i] += weight * v[b, :, j]
    got = gaussian_filter_exact(feats, vals, chunk=7).flatten(2).numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-12)


@pytest.mark.parametrize("d, sigmas", [(5, (3.0, 20.0)), (5, (50.0, 15.0)), (2, (0.7, None))])
def test_lattice_matches_scalar_reference(d, sigmas):
    g = torch.Generator().manual_seed(d)
    if d == 5:
        image = natural_image(7, 9, seed=1)
        image[..., :2, :3] = 128.0  # ties between residuals
        feats = bilateral_features(image, *sigmas)
    else:
        feats = pixel_grid(1, 7, 9, sigmas[0])
    vals = torch.rand(1, 3, 7, 9, generator=g, dtype=torch.float64)
    got = PermutohedralLattice(feats)(vals).flatten(2)[0].T.numpy()
    ref = lattice_reference(feats.flatten(2)[0].T.numpy(), vals.flatten(2)[0].T.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def _pydensecrf_lattice(feats: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """pydensecrf's raw (un-normalised) lattice filter of (C, N) values over (d, N) features,
    read back through one mean-field step against an extra all-zero label: Q = softmax(K v)."""
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    eigen = pytest.importorskip("pydensecrf.eigen")
    c, n = vals.shape
    crf = dcrf.DenseCRF(n, c + 1)
    crf.setUnaryEnergy(np.zeros((c + 1, n), np.float32))
    crf.addPairwiseEnergy(
        np.ascontiguousarray(feats, dtype=np.float32),
        compat=1.0,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NO_NORMALIZATION,
    )
    _, tmp1, tmp2 = crf.startInference()
    q = eigen.matrixXf(
        np.ascontiguousarray(np.concatenate([vals, np.zeros((1, n))]), dtype=np.float32)
    )
    crf.stepInference(q, tmp1, tmp2)
    q = np.asarray(q, dtype=np.float64)
    return np.log(q[:-1]) - np.log(q[-1:])


@pytest.mark.parametrize("sigmas", [(121.0, 5.0), (50.0, 15.0)])
def test_lattice_matches_pydensecrf(sigmas):
    pytest.importorskip("pydensecrf.densecrf")
    image = natural_image(48, 64, seed=2)
    feats = bilateral_features(image, *sigmas)
    vals = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    lat = PermutohedralLattice(feats)
    vals = vals * (4 / lat(vals).max())  # keep the softmax read-back precise
    ours = lat(vals).flatten(2)[0].numpy()
    ref = _pydensecrf_lattice(feats.flatten(2)[0].numpy(), vals.flatten(2)[0].numpy())
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sigmas", [(50.0, 15.0), (121.0, 5.0), (20.0, 10.0)])
def test_lattice_within_bound_on_natural_images(seed, sigmas):
    """The guarantee for photo-like features at the energy-loss and CRF sigmas, random values;
    the raw sums are ~0.55x the exact ones (the C++ lattice's scale, kept on purpose)."""
    feats = bilateral_features(natural_image(32, 40, seed), *sigmas)
    vals = torch.rand(
        1, 3, 32, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    rel, scale = lattice_vs_exact(feats, vals)
    assert rel <= LATTICE_REL_L2_NATURAL
    assert 0.45 <= scale <= 0.7


@pytest.mark.parametrize("sigmas", [(14.0, 15.0), (10.0, 30.0), (5.0, 50.0), (1.0, 1000.0)])
def test_lattice_within_bound_on_noise(sigmas):
    """Worst case: i.i.d. random colours, sparse at the kernel's scale."""
    g = torch.Generator().manual_seed(3)
    image = (torch.rand(1, 3, 32, 40, generator=g) * 255).round()
    vals = torch.rand(1, 3, 32, 40, generator=g, dtype=torch.float64)
    assert lattice_vs_exact(bilateral_features(image, *sigmas), vals)[0] <= LATTICE_REL_L2_ANY


def test_images_of_a_batch_do_not_interact():
    images = torch.cat([natural_image(20, 24, 0), natural_image(20, 24, 1)])
    feats = bilateral_features(images, 30.0, 10.0)
    vals = torch.rand(2, 4, 20, 24, generator=torch.Generator().manual_seed(0))
    both = PermutohedralLattice(feats)(vals)
    for i in range(2):
        alone = PermutohedralLattice(feats[i : i + 1])(vals[i : i + 1])
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_lattice_backward_is_the_exact_transpose():
    """<K x, y> = <x, Kᵀ y> with Kᵀ y from autograd, for random x, y: the backward is the
    transpose (gradcheck's finite differences test the same thing, 100x slower)."""
    feats = bilateral_features(natural_image(10, 12, 4), 8.0, 12.0)
    lat = PermutohedralLattice(feats)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.rand(1, 2, 10, 12, generator=g, dtype=torch.float64, requires_grad=True)
        y = torch.rand(1, 2, 10, 12, generator=g, dtype=torch.float64)
        forward = (lat(x) * y).sum()
        (kt_y,) = torch.autograd.grad(forward, x)
        torch.testing.assert_close((x * kt_y).sum(), forward, rtol=1e-8, atol=0)
        # the lattice is not symmetric: the transpose is not the forward filter itself
        assert (kt_y - lat(y)).abs().max() > 1e-6 * kt_y.abs().max()


def test_float32_and_float64_agree():
    feats = bilateral_features(natural_image(16, 16, 5), 20.0, 10.0)
    vals = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    lat = PermutohedralLattice(feats)
    torch.testing.assert_close(lat(vals.float()).double(), lat(vals), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.5])
def test_gaussian_blur_is_exact(sigma):
    vals = torch.rand(2, 3, 17, 13, dtype=torch.float64)
    exact = gaussian_filter_exact(pixel_grid(2, 17, 13, sigma).double(), vals)
    torch.testing.assert_close(gaussian_blur(vals, sigma), exact, rtol=2e-4, atol=0)
    channels_last = gaussian_blur(vals.permute(0, 2, 3, 1), sigma, dims=(1, 2))
    torch.testing.assert_close(channels_last.permute(0, 3, 1, 2), exact, rtol=2e-4, atol=0)


def test_bilateral_filter_methods_and_errors():
    image = natural_image(12, 12, 6)
    vals = torch.rand(1, 2, 12, 12, dtype=torch.float64)
    exact = bilateral_filter(image, vals, 30.0, 10.0, method="exact")
    lattice = bilateral_filter(image, vals, 30.0, 10.0, method="lattice")
    assert lattice.shape == exact.shape and (lattice > 0).all()
    with pytest.raises(ValueError, match="unknown method"):
        bilateral_filter(image, vals, 30.0, 10.0, method="grid")
    with pytest.raises(ValueError, match="do not match"):
        PermutohedralLattice(bilateral_features(image, 30.0, 10.0))(vals[..., :6, :])
    with pytest.raises(ValueError, match="too large"):
        PermutohedralLattice(torch.tensor([[[0.0, 1e6]] * 5]))
