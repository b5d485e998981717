"""The training loader at the VOC recipe on generated real-size JPEGs: outputs pinned for a seed,
the benchmark's step timers transparent, and a throughput floor in process CPU time."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

import datasets.voc as voc_module
from scripts.bench_data import (
    StepTimes,
    build_dataset,
    loader_rate,
    step_profile,
    timed_steps,
)
from toco.train.sampling import SeededSamples

# sha1 of samples 0-2 (every tensor, in key order) at configs/voc_vit_b.yaml on three generated
# 500x375 JPEGs (scripts/realsize.py, seed 0). It changes when the augmentation, the sampling
# seeds or the generator change -- or with another Pillow/libjpeg/torchvision: then re-pin it
# after checking that the change is meant.
PINNED_VOC = "c968934e81c304f6091ecf624f79d911878ea80a"
KEYS = ("image", "view2", "local_view", "cls_label", "img_box")


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return build_dataset("voc", tmp_path_factory.mktemp("bench_data"), 3)


def digest(samples: list[dict]) -> str:
    h = hashlib.sha1()
    for s in samples:
        for k in KEYS:
            h.update(k.encode())
            h.update(s[k].numpy().tobytes())
    return h.hexdigest()


def test_voc_recipe_samples_are_pinned_for_the_seed(voc):
    cfg, dataset = voc
    assert cfg.crop_size == 448 and len(dataset) == 3
    samples = [SeededSamples(dataset, cfg.seed)[k] for k in range(3)]
    assert samples[0]["image"].shape == (3, 448, 448) and samples[0]["image"].dtype == torch.uint8
    assert digest(samples) == PINNED_VOC


def test_step_timers_leave_the_samples_and_the_dataset_unchanged(voc):
    cfg, dataset = voc
    plain = [SeededSamples(dataset, cfg.seed)[k] for k in range(2)]
    times = StepTimes()
    before = voc_module.random_scale
    with timed_steps(dataset, times):
        timed = [SeededSamples(dataset, cfg.seed)[k] for k in range(2)]
    assert digest(plain) == digest(timed)
    assert voc_module.random_scale is before and "read_image" not in dataset.__dict__
    assert set(times.seconds) == {
        "decode JPEG",
        "rescale",
        "flip",
        "pad + crop",
        "to uint8 tensors (3)",
        "local view (jitter, grey, blur .5)",
        "main view (jitter, grey, blur 1)",
        "second view: resized crop (bicubic)",
        "second view (flip, jitter, grey, blur .1, solarize .2)",
    }
    assert all(v > 0 for v in times.seconds.values())


def test_profile_parts_add_up_and_the_loader_serves_the_recipe_batch(voc):
    cfg, dataset = voc
    profile = step_profile(dataset, cfg.seed, 2)
    parts = sum(v for k, v in profile.items() if k != "total")
    assert parts == pytest.approx(profile["total"])
    assert loader_rate(dataset, cfg.seed, batch_size=2, workers=0, batches=1) > 0


def test_one_process_builds_at_least_12_voc_samples_per_cpu_second(voc):
    """The floor of the issue (12 samples/s for one process) in process CPU time, which other
    jobs on a shared machine disturb far less than wall time (measured ~33/s on this machine,
    idle and 2-core); a regression of the augmentation path by ~3x fails it."""
    cfg, dataset = voc
    samples = SeededSamples(dataset, cfg.seed)
    samples[0]
    tic = time.process_time()
    for k in range(12):
        samples[k]
    rate = 12 / (time.process_time() - tic)
    assert rate >= 12, f"{rate:.1f} samples per CPU second"
