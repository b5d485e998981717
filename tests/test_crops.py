"""Local-crop sampling for CTC (S3.2): positions, candidates, flags, fallback, determinism."""

import pytest
import torch

from toco.method.crops import sample_local_crops


def find_position(image: torch.Tensor, crop: torch.Tensor) -> tuple[int, int]:
    """Top-left (y, x) of the unique place where crop equals a slice of image (C, H, W)."""
    s = crop.shape[-1]
    hits = [
        (y, x)
        for y in range(image.shape[1] - s + 1)
        for x in range(image.shape[2] - s + 1)
        if torch.equal(image[:, y : y + s, x : x + s], crop)
    ]
    assert len(hits) == 1
    return hits[0]


def make_inputs(b=2, h=24, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, h, w, generator=g)  # continuous values: positions are recoverable
    roi = torch.randint(0, 3, (b, h, w), generator=g).to(torch.int16)
    return image, roi


def test_crops_are_direct_slices_and_flags_are_direct_sums():
    image, roi = make_inputs()
    b, n, s, m = 2, 5, 8, 4
    crops, flags = sample_local_crops(
        image,
        roi,
        num_crops=n,
        crop_size=s,
        neg_ratio=0.9,
        generator=torch.Generator().manual_seed(1),
    )
    assert crops.shape == (n * b, 3, s, s) and flags.shape == (b, n)
    assert flags.dtype == torch.float32
    for i in range(b):
        seen = set()
        for j in range(n):
            y, x = find_position(image[i], crops[j * b + i])  # view-major rows
            seen.add((y, x))
            assert roi[i, y + m, x + m] <= 1  # centre is not confident foreground
            ratio = roi[i, y : y + s, x : x + s].double().sum().item() / (s * s)
            assert flags[i, j].item() == (1.0 if ratio > 0.9 else 0.0)
        assert len(seen) == n  # distinct
    assert 0 < flags.sum() < flags.numel()  # both kinds occur with this threshold


def test_confident_foreground_never_chosen_when_enough_candidates():
    h = w = 20
    s, m = 8, 4
    roi = torch.full((1, h, w), 2, dtype=torch.int16)
    allowed = [(5, 6), (7, 11), (14, 4), (9, 9), (13, 15), (4, 4)]  # full-image centres
    for y, x in allowed:
        roi[0, y, x] = 1 if (y + x) % 2 else 0
    roi[0, 0, 0] = 0  # outside the window: must never be used
    image = torch.rand(1, 3, h, w)
    for seed in range(5):
        crops, _ = sample_local_crops(
            image, roi, num_crops=6, crop_size=s, generator=torch.Generator().manual_seed(seed)
        )
        centres = {tuple(v + m for v in find_position(image[0], c)) for c in crops}
        assert centres == set(allowed)


def test_fallback_uses_every_window_position_when_too_few_candidates():
    h = w = 12
    s = 8  # window of centres is 4x4 = 16 positions
    roi = torch.full((2, h, w), 2, dtype=torch.int16)
    roi[1, 6, 6] = 0  # one candidate only (window position (2, 2)), fewer than num_crops
    image = torch.rand(2, 3, h, w)
    crops, flags = sample_local_crops(
        image, roi, num_crops=16, crop_size=s, generator=torch.Generator().manual_seed(0)
    )
    for i in range(2):
        pos = {find_position(image[i], crops[j * 2 + i]) for j in range(16)}
        assert pos == {(y, x) for y in range(4) for x in range(4)}
    assert (flags == 1).all()  # mostly-foreground crops are positive
    # With 8 of 16 drawn, the fallback draws uniformly from the whole window: over 20 draws every
    # position shows up, and the lone candidate is not always among them.
    picked: list[set] = []
    for seed in range(20):
        crops, _ = sample_local_crops(
            image, roi, num_crops=8, crop_size=s, generator=torch.Generator().manual_seed(seed)
        )
        picked.append({find_position(image[1], crops[j * 2 + 1]) for j in range(8)})
    assert set().union(*picked) == {(y, x) for y in range(4) for x in range(4)}
    assert not all((2, 2) in p for p in picked)


def test_flag_threshold_is_inclusive_for_negatives():
    # Every 5-wide crop holds exactly one column of 1s: ratio = 5 / 25 = 0.2 <= neg_ratio -> 0.
    roi = torch.zeros(1, 12, 15, dtype=torch.int16)
    roi[..., ::5] = 1
    _, flags = sample_local_crops(
        torch.rand(1, 3, 12, 15),
        roi,
        num_crops=6,
        crop_size=5,
        neg_ratio=0.2,
        generator=torch.Generator().manual_seed(0),
    )
    assert (flags == 0).all()
    _, flags = sample_local_crops(
        torch.rand(1, 3, 12, 15),
        roi,
        num_crops=6,
        crop_size=5,
        neg_ratio=0.19,
        generator=torch.Generator().manual_seed(0),
    )
    assert (flags == 1).all()


def test_flags_negative_for_background_crops_hand_case():
    h = w = 16
    roi = torch.zeros(1, h, w, dtype=torch.int16)
    roi[0, :, 8:] = 2  # right half confident foreground
    image = torch.rand(1, 3, h, w)
    crops, flags = sample_local_crops(
        image,
        roi,
        num_crops=8,
        crop_size=8,
        neg_ratio=0.2,
        generator=torch.Generator().manual_seed(3),
    )
    for j in range(8):
        y, x = find_position(image[0], crops[j])
        fg_cols = x  # crop columns [x, x + 8) that are >= 8, for x < 8
        ratio = 2 * 8 * fg_cols / 64
        assert flags[0, j].item() == float(ratio > 0.2)
        assert x + 4 < 8  # centres only in the background half


def test_seeded_generator_is_deterministic_and_seed_dependent():
    image, roi = make_inputs(b=3, h=40, w=40, seed=5)
    a = sample_local_crops(image, roi, 8, 16, generator=torch.Generator().manual_seed(11))
    b = sample_local_crops(image, roi, 8, 16, generator=torch.Generator().manual_seed(11))
    c = sample_local_crops(image, roi, 8, 16, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_uniform_over_candidates():
    # 4 candidates, 2 picks: each candidate chosen with probability 1/2.
    roi = torch.full((1, 10, 10), 2, dtype=torch.int16)
    for y, x in [(3, 3), (3, 6), (6, 3), (6, 6)]:
        roi[0, y, x] = 0
    image = torch.arange(100.0).reshape(1, 1, 10, 10).expand(1, 3, 10, 10).contiguous()
    gen = torch.Generator().manual_seed(0)
    counts: dict[float, int] = {}
    trials = 400
    for _ in range(trials):
        crops, _ = sample_local_crops(image, roi, num_crops=2, crop_size=6, generator=gen)
        for c in crops:
            counts[c[0, 0, 0].item()] = counts.get(c[0, 0, 0].item(), 0) + 1
    assert sorted(counts) == [0.0, 3.0, 30.0, 33.0]  # top-left of the crop centred on each
    assert all(abs(v / trials - 0.5) < 0.1 for v in counts.values())


@pytest.mark.parametrize("h,w", [(7, 20), (20, 7), (8, 8)])
def test_too_small_image_raises(h, w):
    with pytest.raises(ValueError, match="crop"):
        sample_local_crops(torch.rand(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.int16), 2, 8)
