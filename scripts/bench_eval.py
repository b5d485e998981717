"""Benchmark evaluation throughput: images/s of the test-time protocols, with and without CRF.

    python -m scripts.bench_eval --device cuda                        # ViT-B/16, VOC-sized images
    python -m scripts.bench_eval --device cpu --threads 1 --backbone deit_tiny_patch16_224 \
        --images 4 --repeats 3                                        # a quick CPU check
    python -m scripts.bench_eval --checkpoint work_dirs/voc/checkpoints/last.pt --json bench.json

Each configuration (protocol x CRF on/off) processes --images images of --image-size (one per
batch, as evaluate.py does); configurations are interleaved over --repeats rounds so that all
see the same machine load, and the table reports the median images/s. Peak memory is the CUDA
allocator's peak per configuration, or on the CPU the process's max RSS (one number for the
whole run: the OS cannot reset it). Weights are random unless --checkpoint is given: speed does
not depend on them. The header names the device, threads and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from scripts.timing import timed
from toco.build import build_model
from toco.cli import ArgumentParser
from toco.config import TrainConfig
from toco.evaluation.protocol import PROTOCOL_NAMES, build_protocol, seg_prediction
from toco.runtime import resolve_device


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a run's last.pt (default: random weights)")
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--image-size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"))
    p.add_argument(
        "--protocols", nargs="+", choices=PROTOCOL_NAMES, default=["train-val", "voc-ms"]
    )
    p.add_argument("--no-crf", action="store_true", help="skip the CRF configurations")
    p.add_argument("--images", type=int, default=20, help="images per measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed images per configuration")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def load_model(args: argparse.Namespace, device: torch.device):
    if args.checkpoint:
        from toco import build
        from toco.checkpoint import load_checkpoint

        state = load_checkpoint(args.checkpoint, map_location=device)
        cfg = TrainConfig.from_dict(state["config"], args.checkpoint)
        model = build_model(cfg, build.dataset_spec(cfg).num_classes, pretrained="none")
        model.load_state_dict(state["model"])
    else:
        cfg = TrainConfig(backbone=args.backbone, pretrained="none")
        model = build_model(cfg, args.num_classes, pretrained="none")
    return model.to(device).eval(), cfg


def test_images(n: int, size: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
    """Smooth random uint8 pictures (1, 3, H, W): CRF cost depends a little on the content."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        low = torch.rand(1, 3, 6, 8, generator=g) * 255
        img = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        out.append(img.round().to(torch.uint8).to(device))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = resolve_device(args.device)
    model, cfg = load_model(args, device)
    images = test_images(args.images, tuple(args.image_size), device)
    configs = {}
    for name in args.protocols:
        for crf in [False] if args.no_crf else [False, True]:
            configs[f"{name}{' +CRF' if crf else ''}"] = build_protocol(
                name, cfg, crf="torch" if crf else None
            )

    def run(protocol, batch) -> None:
        with torch.no_grad():
            for image in batch:
                seg_prediction(protocol, protocol.seg_logits(model, image.float() / 255), image)

    rates: dict[str, list[float]] = {k: [] for k in configs}
    peaks: dict[str, float] = {k: 0.0 for k in configs}
    for protocol in configs.values():
        run(protocol, images[: args.warmup])
    for _ in range(args.repeats):
        for key, protocol in configs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rates[key].append(len(images) / timed(lambda p=protocol: run(p, images), device))
            if device.type == "cuda":
                peaks[key] = max(peaks[key], torch.cuda.max_memory_allocated(device) / 2**20)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads")
    )
    print(
        f"# {where}; torch {torch.__version__}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; backbone {cfg.backbone}; "
        f"images {args.image_size[0]}x{args.image_size[1]}; median of {args.repeats}"
    )
    mem_title = "peak CUDA MiB" if device.type == "cuda" else "max RSS MiB (run)"
    print(f"| configuration | images/s | {mem_title} |\n|---|---|---|")
    results = []
    for key in configs:
        rate = statistics.median(rates[key])
        mem = peaks[key] if device.type == "cuda" else rss_mb
        print(f"| {key} | {rate:.2f} | {mem:.0f} |")
        results.append(
            {
                "configuration": key,
                "images_per_s": rate,
                "all_rates": rates[key],
                "peak_memory_mib": mem,
                "protocol": configs[key].to_dict(),
            }
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": where,
                    "torch": torch.__version__,
                    "backbone": cfg.backbone,
                    "image_size": list(args.image_size),
                    "images": args.images,
                    "repeats": args.repeats,
                    "load_average": os.getloadavg(),
                    "memory_kind": "cuda_max_allocated"
                    if device.type == "cuda"
                    else "process_max_rss",
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
