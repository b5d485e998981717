"""Convert an official ToCo checkpoint (rulixiang/ToCo) into this project's release format.

    python -m toco.convert --from toco-official model_iter_20000.pth --output model.safetensors

The official file is a plain `state_dict` of its `network` (keys `encoder.*`, `classifier.weight`,
`aux_classifier.weight`, `decoder.conv6/7/8.weight`, `proj_head.*`, `proj_head_t.*`, possibly
prefixed `module.` by DDP). Every tensor is renamed onto `models.network.ToCoNet`; the forked
encoder's unused 1000-class `head` is dropped and so, in releases, is the CTC teacher. What the
tensors say (width, depth, patch, position grid, classes, decoder and CTC widths) is read from
them; what they cannot say (ViT-B and DeiT-B have identical tensors; the aux layer) comes from
the flags, from arguments embedded in the file, or from the file name ("deit"/"vit").
The config starts from the matching published recipe (configs/{voc,coco}_{vit,deit}_b.yaml), so
the converted model runs as the official network: ImageNet input normalisation, its thresholds
and CAM scales.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from toco.cli import ArgumentParser, run_cli
from toco.errors import UserError

SOURCE = "toco-official"
FAMILIES = ("vit", "deit")
# The timm weights each official factory was initialised from (its default_cfg URL), which the
# published recipes of this project train from as well.
OFFICIAL_BACKBONES = {
    "vit": "vit_base_patch16_224.orig_in21k_ft_in1k",
    "deit": "deit_base_patch16_224.fb_in1k",
}
DATASET_OF_CLASSES = {21: "voc", 81: "coco"}
DEFAULT_DATA_ROOTS = {"voc": "VOCdevkit/VOC2012", "coco": "coco2014"}
# Tensors of one encoder block, relative to `encoder.blocks.<i>.`.
BLOCK_TENSORS = tuple(
    f"{m}.{p}"
    for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for p in ("weight", "bias")
)
ENCODER_TENSORS = (
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
)
# The forked ViT keeps timm's 1000-class head, which ToCo never uses.
UNUSED_TENSORS = ("encoder.head.weight", "encoder.head.bias")
HEAD_TENSORS = (
    "classifier.weight",
    "aux_classifier.weight",
    "decoder.conv6.weight",
    "decoder.conv7.weight",
    "decoder.conv8.weight",
)
CTC_TENSORS = (
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
    "mlp.4.weight",
    "mlp.4.bias",
    "last_layer.weight_g",
    "last_layer.weight_v",
)
# Official CTC head -> ours (torch.nn.utils.parametrizations.weight_norm's names).
CTC_RENAMES = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
}
CTC_HEADS = {"proj_head.": "proj_head.", "proj_head_t.": "proj_head_teacher.module."}
CTC_BOTTLENECK = 256  # fixed in both implementations


@dataclass(frozen=True)
class OfficialArch:
    """What an official state_dict says about its network."""

    embed_dim: int
    depth: int
    patch_size: int
    pos_grid: int
    mlp_dim: int
    num_classes: int
    decoder_dim: int
    ctc_hidden_dim: int
    ctc_out_dim: int


@dataclass
class Converted:
    """A converted checkpoint: our state_dict (teacher included), its config and class names."""

    tensors: dict[str, Tensor]
    config: dict[str, Any]
    class_names: tuple[str, ...]
    iteration: int
    arch: OfficialArch


# ---- reading the file ----
def read_official(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict without `module.` prefixes, embedded arguments) of an official file.

    Refuses with one line a file torch cannot read (e.g. truncated), one of this project's
    own checkpoints or releases, and anything that is not a mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        raise UserError(
            f"{path} is a .safetensors file, not an official ToCo checkpoint (.pth); "
            "a release of this project is used as it is"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{path} cannot be read as a PyTorch checkpoint (truncated or not a "
            f"checkpoint?): {first[:200]}"
        ) from None
    if not isinstance(payload, Mapping):
        raise UserError(
            f"{path} holds a {type(payload).__name__}, not the state_dict of an "
            "official ToCo network"
        )
    if "trainer" in payload or ("config" in payload and "model" in payload):
        raise UserError(
            f"{path} is a training checkpoint of this project, not an official "
            "ToCo one: write its release with python -m toco.export --checkpoint "
            f"{path} --output model.safetensors"
        )
    args: dict[str, Any] = {}
    for wrapper in ("state_dict", "model"):
        if isinstance(payload.get(wrapper), Mapping):
            extra = payload.get("args")
            args = dict(extra) if isinstance(extra, Mapping) else {}
            payload = payload[wrapper]
            break
    state = {}
    for key, value in payload.items():
        if not isinstance(value, Tensor):
            raise UserError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: "
                "not the state_dict of an official ToCo network"
            )
        state[str(key).removeprefix("module.")] = value
    return state, args


def expected_keys(depth: int) -> list[str]:
    """Every tensor of an official `network` whose encoder has `depth` blocks (head excluded)."""
    keys = [f"encoder.{k}" for k in ENCODER_TENSORS]
    keys += [f"encoder.blocks.{i}.{k}" for i in range(depth) for k in BLOCK_TENSORS]
    keys += list(HEAD_TENSORS)
    keys += [f"{head}{k}" for head in CTC_HEADS for k in CTC_TENSORS]
    return keys


def _few(keys: list[str], limit: int = 4) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(state: Mapping[str, Tensor], path: str | Path) -> int:
    """The encoder depth, after checking the keys are exactly an official network's."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    expected = expected_keys(depth)
    missing = [k for k in expected if k not in state]
    allowed = set(expected) | set(UNUSED_TENSORS)
    unexpected = [k for k in state if k not in allowed]
    if not missing and not unexpected:
        return depth
    hint = ""
    if any(k.startswith(("blocks.", "cls_token", "patch_embed.")) for k in state):
        hint = " (a timm/backbone checkpoint? train from it with --pretrained FILE instead)"
    elif any(k.startswith("backbone.vit.") for k in state):
        hint = " (weights of this project's own model: python -m toco.export writes its release)"
    parts = [
        f"{label} {_few(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    raise UserError(f"{path} is not an official ToCo checkpoint: {'; '.join(parts)}{hint}")


def infer_arch(state: Mapping[str, Tensor], depth: int, path: str | Path) -> OfficialArch:
    """Widths, patch, position grid and classes from the tensor shapes."""
    patch = state["encoder.patch_embed.proj.weight"]
    embed_dim, _, p, p2 = patch.shape
    tokens = state["encoder.pos_embed"].shape[1] - 1
    grid = round(tokens**0.5)
    if p != p2 or grid * grid != tokens:
        raise UserError(
            f"{path}: a {p}x{p2} patch and {tokens} position tokens: not the square "
            "patch grid of an official ToCo encoder"
        )
    num_fg = state["classifier.weight"].shape[0]
    bottleneck = state["proj_head.mlp.4.weight"].shape[0]
    if bottleneck != CTC_BOTTLENECK:
        raise UserError(
            f"{path}: CTC head bottleneck {bottleneck}, the official network's is {CTC_BOTTLENECK}"
        )
    return OfficialArch(
        embed_dim=int(embed_dim),
        depth=depth,
        patch_size=int(p),
        pos_grid=grid,
        mlp_dim=int(state["encoder.blocks.0.mlp.fc1.weight"].shape[0]),
        num_classes=int(num_fg) + 1,
        decoder_dim=int(state["decoder.conv6.weight"].shape[0]),
        ctc_hidden_dim=int(state["proj_head.mlp.0.weight"].shape[0]),
        ctc_out_dim=int(state["proj_head.last_layer.weight_v"].shape[0]),
    )


# ---- renaming ----
def rename_key(key: str) -> Optional[str]:
    """Our name for an official tensor; None for the tensors ToCo never used."""
    if key in UNUSED_TENSORS:
        return None
    if key.startswith("encoder."):
        return "backbone.vit." + key.removeprefix("encoder.")
    if key in ("classifier.weight", "aux_classifier.weight"):
        return key.replace(".weight", ".conv.weight")
    if key.startswith("decoder."):
        return key
    for official, ours in CTC_HEADS.items():
        if key.startswith(official):
            rest = key.removeprefix(official)
            return ours + CTC_RENAMES.get(rest, rest)
    raise KeyError(key)  # check_keys lets no other key through


def convert_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official tensors under our names (float32, contiguous); the unused head dropped."""
    out = {}
    for key, value in state.items():
        ours = rename_key(key)
        if ours is not None:
            out[ours] = value.detach().to(torch.float32).contiguous()
    return out


# ---- what the tensors cannot say ----
def resolve_family(
    path: str | Path, args: Mapping[str, Any], family: Optional[str], backbone: Optional[str] = None
) -> str:
    """'vit' or 'deit': the flag, else the timm name given, the embedded --backbone, the file
    name."""
    if family:
        return family
    for text in (backbone or "", str(args.get("backbone", "")), Path(path).name):
        low = text.lower()
        if "deit" in low:
            return "deit"
        if "vit" in low:
            return "vit"
    raise UserError(
        f"{path}: official ViT-B and DeiT-B checkpoints have the same tensors and "
        "neither its name nor embedded arguments say which this is: pass "
        "--family vit or --family deit"
    )


def timm_depth(name: str) -> int:
    """Blocks of timm model `name` as timm builds it (on the meta device: no memory, no hub)."""
    import timm

    with torch.device("meta"):
        return len(timm.create_model(name, pretrained=False).blocks)


def build_config(
    arch: OfficialArch,
    family: str,
    backbone: Optional[str],
    aux_layer: Optional[int],
    data_root: Optional[str],
    args: Mapping[str, Any],
    path: str | Path,
) -> dict[str, Any]:
    """The published recipe for (dataset, family), with the checkpoint's own architecture."""
    from toco.config import CONFIG_DIR, parse_config

    dataset = DATASET_OF_CLASSES.get(arch.num_classes)
    if dataset is None:
        raise UserError(
            f"{path}: {arch.num_classes} classes (background included); official "
            "checkpoints have 21 (VOC) or 81 (COCO)"
        )
    name = backbone or OFFICIAL_BACKBONES[family]
    if backbone is None and (arch.embed_dim, arch.patch_size, arch.pos_grid) != (768, 16, 14):
        raise UserError(
            f"{path}: width {arch.embed_dim}, patch {arch.patch_size}, a "
            f"{arch.pos_grid}x{arch.pos_grid} position grid: not the ViT-B/16 of "
            "the released checkpoints; pass --backbone TIMM_NAME with these sizes"
        )
    recipe = CONFIG_DIR / f"{dataset}_{family}_b.yaml"
    aux = aux_layer if aux_layer is not None else args.get("aux_layer")
    argv = [
        "--config",
        str(recipe),
        "--backbone",
        name,
        "--pretrained",
        "none",
        "--data-root",
        data_root or DEFAULT_DATA_ROOTS[dataset],
        "--decoder-dim",
        str(arch.decoder_dim),
        "--ctc-hidden-dim",
        str(arch.ctc_hidden_dim),
        "--ctc-out-dim",
        str(arch.ctc_out_dim),
    ]
    if aux is not None:
        argv += ["--aux-layer", str(int(aux))]
    try:
        if arch.depth != timm_depth(name):
            argv += ["--backbone-depth", str(arch.depth)]
    except (RuntimeError, ValueError) as err:  # an unknown name: the config check says so
        if "Unknown model" not in str(err):
            raise
    cfg, _ = parse_config(argv)
    return cfg.to_dict()


def default_iteration(path: str | Path, config: Mapping[str, Any]) -> int:
    """`model_iter_N.pth` -> N; else the recipe's last iteration (the released final models).

    It matters: evaluation uses the aux CAM before `aux_cam_until_iter` (COCO: 12001)."""
    match = re.search(r"iter[_-]?(\d+)", Path(path).name)
    return int(match.group(1)) if match else int(config["max_iters"])


def convert_official(
    path: str | Path,
    *,
    family: Optional[str] = None,
    backbone: Optional[str] = None,
    aux_layer: Optional[int] = None,
    data_root: Optional[str] = None,
    iteration: Optional[int] = None,
    check: bool = True,
) -> Converted:
    """Read, check and rename an official checkpoint; `check` loads it into our model.

    The loading check refuses (one line naming the keys) a backbone name whose shapes differ.
    """
    from datasets import DATASETS

    state, args = read_official(path)
    depth = check_keys(state, path)
    arch = infer_arch(state, depth, path)
    fam = resolve_family(path, args, family, backbone)
    config = build_config(arch, fam, backbone, aux_layer, data_root, args, path)
    tensors = convert_state_dict(state)
    if check:
        build_from_config(config, tensors, path)
    return Converted(
        tensors=tensors,
        config=config,
        class_names=DATASETS[config["dataset"]].class_names,
        iteration=default_iteration(path, config) if iteration is None else iteration,
        arch=arch,
    )


def build_from_config(config: Mapping[str, Any], tensors: Mapping[str, Tensor], path: str | Path):
    """ToCoNet of `config` with `tensors` loaded (UserError naming keys that do not fit)."""
    from datasets import DATASETS
    from toco.build import build_model
    from toco.checkpoint import load_weights
    from toco.config import TrainConfig

    cfg = TrainConfig.from_saved(dict(config), str(path))
    model = build_model(cfg, DATASETS[cfg.dataset].num_classes, pretrained="none")
    load_weights(model, tensors, path, what="converted")
    return model.eval(), cfg


def load_official_model(path: str | Path, device: str | torch.device = "cpu", **options):
    """(model, config) straight from an official checkpoint, for on-the-fly evaluation."""
    converted = convert_official(path, check=False, **options)
    model, cfg = build_from_config(converted.config, converted.tensors, path)
    return model.to(device), cfg


def is_official_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds an official ToCo state_dict (read memory-mapped: keys only).

    For a caller that takes either file, e.g. evaluation: True -> `checkpoint_state(path)`,
    False -> `toco.checkpoint.load_checkpoint(path)` (whose errors then name the problem)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable here: the project's own loader reports why
        return False
    return isinstance(payload, Mapping) and any(
        str(k).removeprefix("module.") == "encoder.patch_embed.proj.weight" for k in payload
    )


def checkpoint_state(path: str | Path, **options) -> dict[str, Any]:
    """An official checkpoint as `toco.checkpoint.load_checkpoint` returns ours: `model`,
    `config` and `iteration` entries, so evaluation can take either file."""
    converted = convert_official(path, check=False, **options)
    return {
        "model": converted.tensors,
        "config": converted.config,
        "iteration": converted.iteration,
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m toco.convert",
        description="Convert an official ToCo checkpoint into a release .safetensors file "
        "(evaluate.py, predict.py and toco.load_segmenter read it).",
        epilog="example: python -m toco.convert --from toco-official model_iter_20000.pth "
        "--family vit --output voc_vit_b.safetensors (docs/reproduce.md)",
    )
    parser.add_argument("checkpoint", help="the official .pth (a state_dict of its network)")
    parser.add_argument(
        "--from",
        dest="source",
        choices=[SOURCE],
        required=True,
        help="the checkpoint's origin: rulixiang/ToCo",
    )
    parser.add_argument("--output", required=True, help="release file to write (.safetensors)")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        help="ViT-B or DeiT-B (same tensors; default: from embedded arguments or the file name)",
    )
    parser.add_argument(
        "--backbone",
        help="timm name of the encoder (default: the published "
        "recipe's for the family: " + ", ".join(OFFICIAL_BACKBONES.values()) + ")",
    )
    parser.add_argument(
        "--aux-layer",
        type=int,
        help="block feeding the aux classifier (default: embedded, else the "
        "recipe's -3, as every official run)",
    )
    parser.add_argument(
        "--data-root",
        help="dataset root recorded in the config (default: "
        + ", ".join(f"{k}: {v}" for k, v in DEFAULT_DATA_ROOTS.items())
        + "; evaluate.py --data-root overrides it)",
    )
    parser.add_argument(
        "--iteration",
        type=int,
        help="training iteration recorded (default: from model_iter_N in the "
        "file name, else the recipe's max_iters)",
    )
    args = parser.parse_args(argv)
    from toco.release import write_release

    converted = convert_official(
        args.checkpoint,
        family=args.family,
        backbone=args.backbone,
        aux_layer=args.aux_layer,
        data_root=args.data_root,
        iteration=args.iteration,
    )
    out = write_release(
        args.output,
        converted.tensors,
        converted.config,
        iteration=converted.iteration,
        class_names=converted.class_names,
        source=SOURCE,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
