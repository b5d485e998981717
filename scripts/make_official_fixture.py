"""Make the official-parity fixtures of tests/test_convert.py with the official ToCo code.

    git clone https://github.com/rulixiang/ToCo /tmp/ToCo && git -C /tmp/ToCo checkout e13514d
    python -m scripts.make_official_fixture --official /tmp/ToCo --out tests/official_fixtures

The official code is imported from --official at run time and never copied here. It builds
three SMALL official networks (its `network` class, its forked ViT, LargeFOV and CTC heads; the
widths shrunk so the fixtures stay small), gives every tensor random values, and records what the
official functions compute on fixed inputs: image logits, raw CAMs of every scale and its flip,
the fused multi-scale CAMs (`multi_scale_cam2`), the PAR-refined training pseudo labels
(`cam_to_label` + `refine_cams_with_bkg_v2` on the uint8-denormalised image), the CTC head
outputs, segmentation logits, and the predictions of the in-training validation and of the
VOC / COCO multi-scale tools (their loops, written out here as they are in the official tools).

Fixtures: `vit_voc` (timm `test_vit` sizes: width 64, 2 heads, MLP x3, 10x10 position grid),
`deit_voc` (built through the official DeiT module, DeiT-tiny layout at width 64: MLP x4, 14x14
grid) and `vit_coco` (81 classes). Three blocks each (aux layer -3 = block 0).

Weights are stored as int8 with a power-of-two scale per tensor: the official network runs with
exactly those values (q * 2^e is a float32), so the test rebuilds them bit for bit at a quarter
of the size. Reduced widths: the encoder head has 8 outputs instead of 1000, LargeFOV 16 channels
instead of 512, the CTC MLP 16 and its output 16 instead of 2048 and 1024 (the bottleneck keeps
256; both implementations fix it).

Packages: the official code needs timm (the installed 1.x works through its deprecated import
paths, with registry warnings); imageio (datasets/transforms.py, of which only `normalize_img`
is used) and matplotlib (utils/imutils.py, for colour maps) are stubbed with empty modules when
they are not installed: no function the fixtures call uses them.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FIXTURES = {
    # name: (classes, official backbone module, VisionTransformer keyword arguments)
    "vit_voc": (21, "vit", dict(img_size=160, mlp_ratio=3)),
    "deit_voc": (21, "deit", dict(img_size=224, mlp_ratio=4)),
    "vit_coco": (81, "vit", dict(img_size=160, mlp_ratio=3)),
}
WIDTH, HEADS, DEPTH, AUX_LAYER, HEAD_OUT = 64, 2, 3, -3, 8
DECODER_DIM, CTC_HIDDEN, CTC_OUT = 16, 16, 16
CAM_SCALES = (1.0, 0.5, 1.5)
TRAIN_HW, VAL_HW, VAL_SIZE = (48, 64), (40, 56), 64
# Imported by official modules for functions the fixtures never call.
STUBBED = ("imageio", "matplotlib", "matplotlib.pyplot")
THRESHOLDS = {21: dict(high=0.7, low=0.25, bkg=0.5), 81: dict(high=0.65, low=0.25, bkg=0.45)}


def import_official(root: Path) -> dict[str, types.ModuleType]:
    """The official modules, imported from the checkout at `root`."""
    sys.path.insert(0, str(root))  # the official checkout: its packages are `model`, `utils`
    for name in STUBBED:
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    import model.backbone as encoder
    import model.decoder.conv_head as conv_head
    import model.model_seg_neg as model_seg_neg
    from model import PAR
    from model.backbone import deit, vit
    from utils import camutils, imutils

    import datasets.transforms as official_transforms

    return dict(
        encoder=encoder,
        vit=vit,
        deit=deit,
        conv_head=conv_head,
        net=model_seg_neg,
        par=PAR,
        cam=camutils,
        im=imutils,
        transforms=official_transforms,
    )


def small_network(off: dict, num_classes: int, module: str, vit_kwargs: dict) -> nn.Module:
    """The official `network` with small widths, built through its own constructor."""
    vit_class = off[module].VisionTransformer

    def factory(pretrained=False, aux_layer=-3):
        return vit_class(
            patch_size=16,
            embed_dim=WIDTH,
            depth=DEPTH,
            num_heads=HEADS,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_classes=HEAD_OUT,
            aux_layer=aux_layer,
            **vit_kwargs,
        )

    official_head, official_fov = off["net"].CTCHead, off["conv_head"].LargeFOV

    class SmallCTCHead(official_head):
        def __init__(self, in_dim, out_dim=4096):
            super().__init__(in_dim, out_dim=CTC_OUT, hidden_dim=CTC_HIDDEN)

    class SmallLargeFOV(official_fov):
        """The official head with its 512 hard-coded channels replaced by DECODER_DIM."""

        def __init__(self, in_planes, out_planes, dilation=5):
            super().__init__(in_planes, out_planes, dilation)
            conv3x3, conv1x1 = off["conv_head"].conv3x3, off["conv_head"].conv1x1
            self.embed_dim = DECODER_DIM
            self.conv6 = conv3x3(in_planes, DECODER_DIM, padding=dilation, dilation=dilation)
            self.conv7 = conv3x3(DECODER_DIM, DECODER_DIM, padding=dilation, dilation=dilation)
            self.conv8 = conv1x1(DECODER_DIM, out_planes, padding=0)

    off["encoder"].fixture_vit = factory  # network() looks the backbone up by name
    off["net"].CTCHead = SmallCTCHead
    off["net"].decoder.LargeFOV = SmallLargeFOV
    try:
        net = off["net"].network(
            "fixture_vit", num_classes=num_classes, init_momentum=0.9, aux_layer=AUX_LAYER
        )
    finally:
        off["net"].CTCHead, off["net"].decoder.LargeFOV = official_head, official_fov
    return net.eval()


def randomise_and_quantise(net: nn.Module, gen: torch.Generator) -> dict[str, dict]:
    """Give every tensor random values on an int8 grid; returns {name: {q, exp}}.

    Random everywhere (also biases, norms, the weight-norm magnitudes), so a mapping that mixes
    two tensors of the same shape changes the outputs.
    """
    stored = {}
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "weight_g")):
                value = 1.0 + 0.1 * noise
            elif name.endswith(("cls_token", "pos_embed")):
                value = 0.5 * noise
            elif t.dim() >= 2:
                value = noise / math.sqrt(t[0].numel())
            else:
                value = 0.1 * noise
            exp = math.ceil(math.log2(value.abs().max().item() / 127))
            q = torch.round(value / 2.0**exp).clamp(-127, 127).to(torch.int8)
            t.copy_(q.float() * 2.0**exp)
            stored[name] = {"q": q, "exp": exp}
    return stored


def smooth_pixels(gen: torch.Generator, n: int, hw: tuple[int, int]) -> torch.Tensor:
    """uint8 images (n, 3, H, W): coarse random colour patches plus noise (PAR needs edges)."""
    coarse = torch.rand((n, 3, 4, 5), generator=gen) * 255
    img = F.interpolate(coarse, size=hw, mode="nearest")
    img = img + 12 * torch.randn((n, 3) + hw, generator=gen)
    return img.clamp(0, 255).round().to(torch.uint8)


def train_normalise(pixels: torch.Tensor) -> torch.Tensor:
    """The official training transform: ToTensor (/255) then Normalize(ImageNet)."""
    from torchvision.transforms import functional as TF

    return TF.normalize(pixels.float().div(255), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def val_normalise(off: dict, pixels: torch.Tensor) -> torch.Tensor:
    """The official evaluation datasets' `normalize_img` (0-255 constants), CHW."""
    hwc = pixels[0].permute(1, 2, 0).numpy()
    return torch.from_numpy(off["transforms"].normalize_img(hwc)).permute(2, 0, 1)[None]


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def record(off: dict, net: nn.Module, num_classes: int, gen: torch.Generator) -> dict:
    """Inputs and official outputs."""
    b, (h, w) = 2, TRAIN_HW
    thre = THRESHOLDS[num_classes]
    pixels = smooth_pixels(gen, b, TRAIN_HW)
    img_box = torch.tensor([[0, 40, 0, 64], [6, 48, 4, 58]])
    for i, (y0, y1, x0, x1) in enumerate(img_box.tolist()):  # crop padding is black
        keep = torch.zeros(h, w, dtype=torch.bool)
        keep[y0:y1, x0:x1] = True
        pixels[i, :, ~keep] = 0
    present = torch.randperm(num_classes - 1, generator=gen)[:4].view(b, 2)
    cls_label = torch.zeros(b, num_classes - 1)
    cls_label.scatter_(1, present, 1.0)
    cam_fn = off["cam"]
    out: dict = {
        "pixels": pixels,
        "img_box": img_box,
        "cls_label": cls_label,
        "present": present.sort(dim=1).values,
    }
    with torch.no_grad():
        x = train_normalise(pixels)
        cls, seg, _, cls_aux = net(x)
        out.update(cls=cls, cls_aux=cls_aux, seg=seg)
        for s in CAM_SCALES:
            xs = (
                x
                if s == 1.0
                else F.interpolate(
                    x, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False
                )
            )
            cam_aux, cam = net(torch.cat([xs, xs.flip(-1)]), cam_only=True)
            out[f"raw_cam_{s}"], out[f"raw_cam_aux_{s}"] = cam, cam_aux
        cams, cams_aux = cam_fn.multi_scale_cam2(net, x, CAM_SCALES)
        idx = out["present"][:, :, None, None].expand(-1, -1, h, w)
        out["cam_present"], out["cam_aux_present"] = cams.gather(1, idx), cams_aux.gather(1, idx)
        valid_cam, _ = cam_fn.cam_to_label(
            cams,
            cls_label,
            img_box=img_box,
            ignore_mid=True,
            bkg_thre=thre["bkg"],
            high_thre=thre["high"],
            low_thre=thre["low"],
            ignore_index=255,
        )
        par = off["par"].PAR(num_iter=10, dilations=[1, 2, 4, 8, 12, 24])
        label = cam_fn.refine_cams_with_bkg_v2(
            par,
            off["im"].denormalize_img2(x.clone()),
            cams=valid_cam,
            cls_labels=cls_label,
            high_thre=thre["high"],
            low_thre=thre["low"],
            ignore_index=255,
            img_box=img_box,
        )
        out["pseudo_label"] = label.to(torch.uint8)
        cls_token = net.encoder.forward_features(x)[0]
        out["ctc_student"] = net.proj_head(cls_token)
        out["ctc_teacher"] = net.proj_head_t(cls_token)
        out.update(record_validation(off, net, num_classes, gen))
    return out


def record_validation(off: dict, net: nn.Module, num_classes: int, gen) -> dict:
    """One evaluation image through the in-training validation and the multi-scale tool."""
    thre = THRESHOLDS[num_classes]
    pixels = smooth_pixels(gen, 1, VAL_HW)
    cls_label = torch.zeros(1, num_classes - 1)
    present = torch.randperm(num_classes - 1, generator=gen)[:2].sort().values
    cls_label[0, present] = 1.0
    x = val_normalise(off, pixels)
    out = {"val_pixels": pixels, "val_cls_label": cls_label, "val_present": present}
    # In-training validation (scripts/dist_train_*_seg_neg.py, validate()).
    inputs = F.interpolate(x, size=[VAL_SIZE, VAL_SIZE], mode="bilinear", align_corners=False)
    _, segs, _, _ = net(inputs)
    cams, _ = off["cam"].multi_scale_cam2(net, inputs, CAM_SCALES)
    cams = F.interpolate(cams, size=VAL_HW, mode="bilinear", align_corners=False)
    out["val_cam_present"] = cams[:, present]
    out["val_cam_label"] = (
        off["cam"]
        .cam_to_label(
            cams,
            cls_label,
            bkg_thre=thre["bkg"],
            high_thre=thre["high"],
            low_thre=thre["low"],
            ignore_index=255,
        )
        .to(torch.uint8)
    )
    segs = F.interpolate(segs, size=VAL_HW, mode="bilinear", align_corners=False)
    out["val_seg_pred"], out["val_seg_margin"] = segs.argmax(1).to(torch.uint8), top2_margin(segs)
    # The multi-scale tools (tools/infer_seg_voc.py, tools/infer_seg_coco_ddp.py).
    if num_classes == 21:
        base, scales, flip_fuse, scale_fuse = x, (1.0, 1.5, 1.25), "sum", "max"
    else:
        base = F.interpolate(x, size=[448, 448], mode="bilinear", align_corners=False)
        scales, flip_fuse, scale_fuse = (1.0, 1.25, 1.5), "max", "sum"
    _, _, h, w = base.shape
    seg_list = []
    for sc in scales:
        scaled = F.interpolate(
            base, size=[int(h * sc), int(w * sc)], mode="bilinear", align_corners=False
        )
        segs = net(torch.cat([scaled, scaled.flip(-1)]))[1]
        segs = F.interpolate(segs, size=VAL_HW, mode="bilinear", align_corners=False)
        pair = (
            segs[:1] + segs[1:].flip(-1)
            if flip_fuse == "sum"
            else torch.max(segs[:1], segs[1:].flip(-1))
        )
        seg_list.append(pair)
    stack = torch.stack(seg_list)
    seg = stack.max(dim=0)[0] if scale_fuse == "max" else stack.sum(dim=0)
    out["ms_seg_pred"], out["ms_seg_margin"] = seg.argmax(1).to(torch.uint8), top2_margin(seg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--official", required=True, type=Path, help="checkout of rulixiang/ToCo at commit e13514d"
    )
    parser.add_argument("--out", type=Path, default=Path("tests/official_fixtures"))
    args = parser.parse_args(argv)
    off = import_official(args.official.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (name, (num_classes, module, vit_kwargs)) in enumerate(FIXTURES.items()):
        torch.manual_seed(i)  # the official constructors draw their own init
        gen = torch.Generator().manual_seed(100 + i)
        net = small_network(off, num_classes, module, vit_kwargs)
        weights = randomise_and_quantise(net, gen)
        fixture = {
            "name": name,
            "num_classes": num_classes,
            "family": module,
            "vit_kwargs": vit_kwargs,
            "weights": weights,
            "outputs": record(off, net, num_classes, gen),
        }
        path = args.out / f"{name}.pt"
        torch.save(fixture, path)
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
