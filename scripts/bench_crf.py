"""Benchmark the PyTorch dense CRF against pydensecrf2, and the regularisation loss's cost.

    python -m scripts.bench_crf                      # CRF: ours vs pydensecrf, 500x375, 21 classes
    python -m scripts.bench_crf --threads 2          # ours on 2 CPU threads (pydensecrf: 1)
    python -m scripts.bench_crf --device cuda --throughput 200   # images/s of ours on a GPU
    python -m scripts.bench_crf --energy             # + energy loss fwd+bwd at crop 448 and 160
    python -m scripts.bench_crf --energy --train-step vit_tiny_patch16_224   # + iteration share

Photos come from scikit-image (`pip install scikit-image`); pydensecrf2 is optional
(`pip install "cython<3" && pip install --no-build-isolation pydensecrf2`). Timings are the
median of --repeats runs, ours and pydensecrf interleaved so that both see the same machine load;
the header prints the CPU, the thread count and the load average, which matter on shared CPUs:
pydensecrf runs on one thread, and so does ours by default. More torch threads help on an idle
CPU (2 threads: 0.67x pydensecrf's time here) but hurt badly on an oversubscribed one, where
OpenMP threads wait for each other at every operation (6x slower at load average 4.4 on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F

from scripts.timing import machine_line, timed
from toco.cli import ArgumentParser
from toco.method.crf import dense_crf, dense_crf_pydensecrf, pydensecrf_available

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")


def load_photos(
    names: tuple[str, ...] = PHOTOS, size: tuple[int, int] = (375, 500)
) -> dict[str, torch.Tensor]:
    """scikit-image's bundled RGB photos as (3, H, W) uint8, resized (antialiased) to `size`."""
    from skimage import data

    out = {}
    for name in names:
        pic = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        img = torch.from_numpy(np.ascontiguousarray(pic[..., :3])).permute(2, 0, 1)[None].float()
        img = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[name] = img.round().clamp(0, 255).to(torch.uint8)[0]
    return out


def decoder_like_probs(
    image: torch.Tensor, num_classes: int, seed: int, cells: tuple[int, int] = (12, 16)
) -> torch.Tensor:
    """(B, C, H, W) softmax of smooth random logits (a few likely classes) plus colour evidence:
    blurry, partly wrong boundaries, as a segmentation decoder gives. image: (B, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = image.shape
    low = torch.randn(b, num_classes, *cells, generator=g) * 2
    low[:, 4:] -= 3
    logits = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    protos = torch.rand(num_classes, 3, generator=g)
    colour = image[:, None].float() / 255
    logits = logits - 4 * (colour - protos[None, :, :, None, None]).square().sum(2)
    return torch.softmax(logits, 1)


def bench_crf(args: argparse.Namespace, device: torch.device) -> None:
    photos = load_photos(tuple(args.photos), tuple(args.size))
    reference = pydensecrf_available() and (device.type == "cpu" or args.compare)
    if not pydensecrf_available():
        print(
            "pydensecrf2 is not installed: timing ours only (pip install 'cython<3' && "
            "pip install --no-build-isolation pydensecrf2)"
        )
        reference = False
    params = dict(iterations=args.iterations)
    print(
        f"\ndense CRF, {args.size[1]}x{args.size[0]}, {args.classes} classes, "
        f"{args.iterations} iterations, ToCo's kernels; median of {args.repeats} (min)"
    )
    head = f"{'image':<11} {'ours [s]':>15}"
    if reference:
        head += f" {'pydensecrf [s]':>16} {'ratio':>6} {'agree':>8}"
    print(head)
    ours_all, ref_all, agree_all = [], [], []
    for seed, (name, image) in enumerate(photos.items()):
        image = image[None].to(device)
        probs = decoder_like_probs(image.cpu(), args.classes, seed).to(device)
        dense_crf(image, probs, **params)  # warm-up (allocator, kernels)
        t_ours, t_ref = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(lambda: dense_crf(image, probs, **params), device))
            if reference:
                t_ref.append(
                    timed(lambda: dense_crf_pydensecrf(image.cpu(), probs.cpu(), **params), device)
                )
        line = f"{name:<11} {statistics.median(t_ours):>7.3f} ({min(t_ours):.3f})"
        ours_all.append(statistics.median(t_ours))
        if reference:
            q_ours = dense_crf(image, probs, **params).argmax(1).cpu()
            q_ref = dense_crf_pydensecrf(image.cpu(), probs.cpu(), **params).argmax(1)
            agree = (q_ours == q_ref).float().mean().item()
            ref_all.append(statistics.median(t_ref))
            agree_all.append(agree)
            line += (
                f" {statistics.median(t_ref):>8.3f} ({min(t_ref):.3f})"
                f" {ours_all[-1] / ref_all[-1]:>6.2f} {agree * 100:>7.3f}%"
            )
        print(line)
    line = f"{'mean':<11} {statistics.mean(ours_all):>7.3f}{'':8}"
    if reference:
        line += (
            f" {statistics.mean(ref_all):>8.3f}{'':8} "
            f"{statistics.mean(ours_all) / statistics.mean(ref_all):>6.2f} "
            f"{min(agree_all) * 100:>7.3f}% (min)"
        )
    print(line)

    if args.throughput:
        image = next(iter(photos.values()))[None].to(device)
        probs = decoder_like_probs(image.cpu(), args.classes, 0).to(device)
        t = timed(
            lambda: [dense_crf(image, probs, **params) for _ in range(args.throughput)], device
        )
        print(
            f"throughput: {args.throughput / t:.1f} images/s over {args.throughput} "
            f"images (batch 1) on {device}"
        )


def bench_energy(args: argparse.Namespace, device: torch.device) -> None:
    from toco.method.cam import box_mask
    from toco.method.energy import dense_energy_loss

    print(
        f"\nregularisation loss (energy at half scale, C={args.classes}, batch 4): "
        f"forward + backward, median of {args.repeats}"
    )
    photos = list(load_photos(tuple(args.photos), (448, 448)).values())
    for crop in (448, 160):
        image = torch.stack(
            [
                F.interpolate(p[None].float(), size=(crop, crop), mode="area")[0]
                for p in (photos * 4)[:4]
            ]
        ).to(device)
        logits = torch.randn(4, args.classes, crop // 4, crop // 4, device=device)
        label = torch.randint(0, args.classes, (4, crop, crop), device=device)
        label[torch.rand(4, crop, crop, device=device) < 0.3] = 255
        box = torch.tensor([[0, crop, 0, crop]] * 4, device=device)

        def step() -> None:
            z = logits.clone().requires_grad_(True)
            up = F.interpolate(z, size=(crop, crop), mode="bilinear", align_corners=False)
            loss = dense_energy_loss(image, torch.softmax(up, 1), box_mask(box, crop, crop), label)
            loss.backward()

        step()
        times = [timed(step, device) for _ in range(args.repeats)]
        print(
            f"crop {crop}: {statistics.median(times) * 1000:.1f} ms (min {min(times) * 1000:.1f})"
        )
        if args.train_step:
            bench_train_step(args, device, crop)


def bench_train_step(args: argparse.Namespace, device: torch.device, crop: int) -> None:
    """Time a full ToCo iteration (seg on) with and without the regularisation loss."""
    from toco.build import build_loss_modules, build_model
    from toco.config import TrainConfig
    from toco.method.energy import RegularizationLoss
    from toco.train.engine import Trainer

    cfg = TrainConfig.from_dict(
        dict(
            backbone=args.train_step,
            pretrained="none",
            crop_size=crop,
            batch_size=4,
            seg_start_iter=0,
            local_crop_size=min(96, crop // 2),
            backbone_depth=args.depth,
        ),
        "benchmark",
    )
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randint(0, 256, (4, 3, crop, crop), generator=g, dtype=torch.uint8),
        "view2": torch.randint(0, 256, (4, 3, 224, 224), generator=g, dtype=torch.uint8),
        "local_view": torch.randint(0, 256, (4, 3, crop, crop), generator=g, dtype=torch.uint8),
        "cls_label": torch.eye(20)[:4],
        "img_box": torch.tensor([[0, crop, 0, crop]] * 4),
    }
    result = {}
    for with_reg in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, 21, pretrained="none").to(device)
        modules = build_loss_modules(cfg) + ([RegularizationLoss(0.05, 0)] if with_reg else [])
        trainer = Trainer(cfg, model, modules, device)
        trainer.train_step(batch, 0)
        times = [
            timed(lambda: trainer.train_step(batch, 1), device) for _ in range(args.step_repeats)
        ]
        result[with_reg] = statistics.median(times)
    print(
        f"  iteration ({args.train_step}{f' depth {args.depth}' if args.depth else ''}, "
        f"crop {crop}, batch 4): {result[False]:.2f} s without reg, {result[True]:.2f} s with "
        f"(+{(result[True] / result[False] - 1) * 100:.1f}%)"
    )


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", nargs="+", default=list(PHOTOS[:4]), choices=PHOTOS)
    p.add_argument("--size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="device of ours (pydensecrf: CPU)")
    p.add_argument(
        "--compare", action="store_true", help="also run pydensecrf when ours runs on a GPU"
    )
    p.add_argument(
        "--throughput",
        type=int,
        default=0,
        metavar="N",
        help="also time N CRFs back to back (images/s)",
    )
    p.add_argument("--energy", action="store_true", help="time the regularisation loss")
    p.add_argument("--skip-crf", action="store_true", help="only the --energy part")
    p.add_argument(
        "--train-step",
        metavar="BACKBONE",
        help="with --energy: also time training iterations with / without it",
    )
    p.add_argument("--depth", type=int, default=None, help="backbone depth for --train-step")
    p.add_argument("--step-repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import skimage  # noqa: F401
    except ImportError:
        print("this benchmark uses scikit-image's bundled photos: pip install scikit-image")
        return 1
    device = torch.device(args.device)
    print(machine_line())
    if not args.skip_crf:
        bench_crf(args, device)
    if args.energy:
        bench_energy(args, device)
    print(machine_line().replace("machine:", "after:"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
