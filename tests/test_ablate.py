"""The plug-in switchboard: flags off leave training bit-identical; config checks; the ablation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.backbone import ViTBackbone
from models.network import ToCoNet
from toco.build import build_loss_modules
from toco.config import TrainConfig, parse_config
from toco.errors import ConfigError
from toco.train.ablate import seconds_per_iter, subset_plugins
from toco.train.engine import Trainer

TINY = dict(
    backbone="deit_tiny_patch16_224",
    pretrained="none",
    backbone_depth=2,
    aux_layer=0,
    crop_size=32,
    local_crop_size=16,
    num_local_crops=2,
    batch_size=2,
    decoder_dim=8,
    cam_scales=(1.0, 0.5),
    par_iters=2,
    par_dilations=(1, 2),
    seg_start_iter=1,
    warmup_iters=1,
    device="cpu",
)


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def img() -> torch.Tensor:
        return torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)

    return {
        "image": img(),
        "view2": img(),
        "local_view": img(),
        "cls_label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        "img_box": torch.tensor([[0, 32, 0, 32], [4, 28, 0, 30]]),
    }


def run_steps(trainer: Trainer, n: int = 3) -> list[dict]:
    return [trainer.train_step(batch(i), i) for i in range(n)]


def test_training_with_every_plugin_off_is_bit_identical_to_plain_toco():
    from toco.build import build_model
    from toco.plugins import build_plugins

    # plug-in hyper-parameters set, switches off: nothing of them may leak into the step
    cfg = TrainConfig.from_dict(
        dict(
            **TINY,
            ppc_tau=0.3,
            rca_dim=16,
            mcis_w_co=3.0,
            w_ppc=1.0,
            w_rca=1.0,
            plugin_start_iter=0,
        )
    )
    torch.manual_seed(0)
    plain = ToCoNet(
        ViTBackbone(cfg.backbone, "none", aux_layer=0, depth=2),
        4,
        decoder_dim=8,
        ema_momentum=cfg.ema_momentum,
    )
    reference = Trainer(cfg, plain, build_loss_modules(cfg), torch.device("cpu"))
    rng_after_plain = torch.get_rng_state()

    torch.manual_seed(0)
    model = build_model(cfg, 4)
    plugins = build_plugins(cfg, model.backbone.embed_dim, 4, model=model)
    assert plugins == [] and len(model.feature_hooks) == 0
    assert torch.equal(torch.get_rng_state(), rng_after_plain)  # no random draw was added
    trainer = Trainer(cfg, model, build_loss_modules(cfg) + plugins, torch.device("cpu"))

    torch.manual_seed(1)
    want = run_steps(reference)
    torch.manual_seed(1)
    got = run_steps(trainer)
    assert got == want  # every logged loss, bit for bit
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_plugins_on_change_the_step_and_stay_finite():
    from toco.build import build_model
    from toco.plugins import build_plugins

    cfg = TrainConfig.from_dict(
        dict(
            **{**TINY, "crop_size": 64, "local_crop_size": 32},
            ppc=True,
            rca=True,
            mcis=True,
            plugin_start_iter=0,
            rca_enqueue_thr=0.0,
            rca_kmeans_every=1,
            rca_dim=16,
            rca_mem_size=4,
            rca_num_centroids=2,
            rca_min_tokens=1,
            rca_mask_source="cam_mean",
            mcis_co_cam="online_fuse",
            mcis_self_pairs=True,
        )
    )
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    plugins = build_plugins(cfg, model.backbone.embed_dim, 4, model=model)
    assert [type(p).__name__ for p in plugins] == [
        "PixelPrototypeContrast",
        "RCACoarseHead",
        "RegionalContrast",
        "CrossImageSemantics",
    ]
    trainer = Trainer(cfg, model, build_loss_modules(cfg) + plugins, torch.device("cpu"))
    b = batch(0)
    b = {
        k: (
            torch.nn.functional.interpolate(v.float(), size=(64, 64)).to(torch.uint8)
            if k in ("image", "view2", "local_view")
            else v
        )
        for k, v in b.items()
    }
    b["img_box"] = torch.tensor([[0, 64, 0, 64], [0, 64, 0, 64]])
    logs = [trainer.train_step(b, i) for i in range(3)]
    for log in logs:
        assert all(math.isfinite(v) for v in log.values())
        assert {
            "ppc_cp",
            "ppc_cc",
            "ppc_intra",
            "ppc_hardest_dropped",
            "rca",
            "rca_coarse",
            "mcis_co",
            "mcis_ex",
            "mcis_self",
        } <= set(log)
    assert int(plugins[2].memory.count.sum()) > 0
    assert int(plugins[3].bank.count.sum()) > 0  # MCIS's related-image partners
    # plug-in parameters are trained (x10 head group), hooks' parameters too
    head_params = {id(p) for p in trainer.optimizer.param_groups[2]["params"]}
    for module in plugins + [model.feature_hooks[0]]:
        assert all(id(p) in head_params for p in module.parameters())


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--ppc", "--ppc-view2-scale", "0.1"], "under 32 px"),
        (["--ppc", "--ppc-semi-hard", "5", "3"], r"plugins.ppc.semi_hard \(--ppc-semi-hard\)"),
        (["--ppc", "--ppc-hard-pixel", "0.5", "0.7", "0.6"], "ppc.hard_pixel"),
        (["--ppc", "--ppc-terms", "0", "0", "0"], "every plugins.ppc.terms"),
        (["--ppc", "--ppc-proto-scope", "global"], "invalid choice"),
        (["--rca", "--rca-num-centroids", "9", "--rca-mem-size", "4"], "rca.num_centroids"),
        (["--rca", "--rca-momentum", "1"], "rca.momentum"),
        (["--rca", "--no-rca-contrast", "--no-rca-aggregation"], "does nothing"),
        (["--mcis", "--batch-size", "5"], "is odd"),
        (["--rca-mask-source", "saliency"], "invalid choice"),
        (["--plugin-start-iter", "-1"], "start_iter must be >= 0"),
        (["--w-rca", "-1"], "plugins.rca.weight must be >= 0"),
    ],
)
def test_bad_plugin_settings_are_config_errors(flags, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(flags)


def test_plugin_start_defaults_to_the_seg_start():
    cfg = TrainConfig(seg_start_iter=123).validate()
    assert cfg.plugins.ppc.start(cfg) == 123
    cfg = TrainConfig.from_dict(
        {"seg_start_iter": 123, "plugin_start_iter": 7, "plugins": {"rca": {"start_iter": 9}}}
    )
    assert [cfg.plugins[n].start(cfg) for n in ("ppc", "rca", "mcis")] == [7, 9, 7]


def test_subset_names():
    assert subset_plugins("base") == () and subset_plugins("all") == ("ppc", "rca", "mcis")
    assert subset_plugins("mcis+ppc") == ("ppc", "mcis")
    with pytest.raises(ConfigError, match="unknown subset"):
        subset_plugins("ppc+crf")


def test_seconds_per_iter_skips_warm_up_and_pre_plugin_windows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"iter": 2, "s_per_iter": 9.0},
        {"iter": 4, "s_per_iter": 1.0},
        {"iter": 4, "val": {}},
        {"iter": 6, "s_per_iter": 2.0},
        {"iter": 10, "s_per_iter": 3.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert seconds_per_iter(path, 0) == pytest.approx((2 * 1 + 2 * 2 + 4 * 3) / 8)
    assert seconds_per_iter(path, 4) == pytest.approx((2 * 2 + 4 * 3) / 6)
    assert seconds_per_iter(path, 100) == pytest.approx((2 * 1 + 2 * 2 + 4 * 3) / 8)
    with path.open("a") as fh:  # resumed from a checkpoint at 8: logs 10 again, then 12
        fh.write(json.dumps({"iter": 10, "s_per_iter": 50.0}) + "\n")
        fh.write(json.dumps({"iter": 12, "s_per_iter": 1.0}) + "\n")
    assert seconds_per_iter(path, 0) == pytest.approx((2 * 1 + 2 * 2 + 4 * 3 + 2 * 1) / 10)


def test_tiny_ablation_runs_every_subset_for_every_seed(tmp_path):
    from tests.fixtures import make_standard_voc_tree
    from tests.test_cli import TINY as CLI_TINY
    from toco.cli import run_cli
    from toco.train import ablate

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    out = tmp_path / "abl"
    argv = [
        "--out",
        str(out),
        "--subsets",
        "base",
        "all",
        "--seeds",
        "0",
        "1",
        "--no-isolate",
        "--dataset",
        "voc",
        "--data-root",
        str(root),
        "--train-split",
        "train",
        "--val-split",
        "val",
        "--cache-dir",
        str(tmp_path / "c"),
        *CLI_TINY,
        "--batch-size",
        "4",
        "--max-iters",
        "2",
        "--seg-start-iter",
        "1",
        "--warmup-iters",
        "1",
        "--eval-every",
        "2",
        "--log-every",
        "1",
        "--plugin-start-iter",
        "0",
        "--threads",
        "1",
    ]
    assert run_cli(lambda: ablate.main(argv)) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["runs"]) == ["base", "all"]
    for name, by_seed in report["runs"].items():
        assert sorted(by_seed) == ["0", "1"]
        assert [r["seed"] for r in by_seed.values()] == [0, 1]
        for row in by_seed.values():
            for key in ("cam_miou", "aux_cam_miou", "pseudo_label_miou", "seg_miou"):
                assert 0 <= row[key] <= 100
            assert row["s_per_iter"] > 0 and row["peak_memory_mb"] > 0
        stats = report["summary"][name]["stats"]["cam_miou"]
        values = [r["cam_miou"] for r in by_seed.values()]
        assert stats["n"] == 2 and stats["mean"] == pytest.approx(sum(values) / 2)
        assert stats["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert report["runs"]["all"]["0"]["plugins"] == ["ppc", "rca", "mcis"]
    assert (out / "all" / "seed1" / "checkpoints" / "last.pt").exists()
    text = (out / "ablation.md").read_text()
    # the data path is held fixed: base trains on the MCIS pair sampler's batches too
    assert "| base | 2 | pairs share_one |" in text and "| all | 2 | pairs share_one |" in text
    assert "Data path held fixed: the pair sampler 'share_one'" in text and "Per seed" in text
    assert report["runs"]["base"]["0"]["config"]["pair_sampler"] == "share_one"
    assert report["meta"]["data_path"] == "fixed"
    assert "| all | 1 |" in text  # the per-seed table
    # results are reused: a second call trains nothing and rewrites the same table
    assert run_cli(lambda: ablate.main(argv)) == 0
    assert (out / "ablation.md").read_text() == text


def test_seed_statistics_and_the_spread_rule():
    from toco.train.ablate import seed_statistics, versus_base

    def runs(values):
        return {
            s: {
                "cam_miou": v,
                "aux_cam_miou": v,
                "pseudo_label_miou": v,
                "seg_miou": None,
                "s_per_iter": 1.0,
                "peak_memory_mb": 1.0,
            }
            for s, v in enumerate(values)
        }

    base = seed_statistics(runs([50.0, 52.0, 54.0]))  # mean 52, std 2
    assert base["cam_miou"]["mean"] == 52.0 and base["cam_miou"]["std"] == pytest.approx(2.0)
    assert base["seg_miou"] == {"n": 0, "mean": None, "std": None, "per_seed": {}}
    far = versus_base(seed_statistics(runs([56.5, 57.0, 57.5])), base)  # +5 > 0.5 + 2
    near = versus_base(seed_statistics(runs([53.0, 55.0, 57.0])), base)  # +3 < 2 + 2
    one = versus_base(seed_statistics(runs([60.0])), base)
    assert far["cam_miou"] == {"diff": pytest.approx(5.0), "exceeds_seed_spread": True}
    assert near["cam_miou"]["exceeds_seed_spread"] is False
    assert one["cam_miou"]["exceeds_seed_spread"] is None and "seg_miou" not in far


def test_fixed_data_path_chooses_one_sampler_for_every_subset():
    from pathlib import Path

    from toco.plugins import pair_policy
    from toco.train.ablate import data_path_note, fixed_data_path, subset_config

    cfg = TrainConfig.from_dict(TINY)
    assert fixed_data_path(cfg, ["base", "ppc"]) is None  # nobody pairs images
    assert fixed_data_path(cfg, ["base", "mcis"]) == "share_one"
    random_mcis = TrainConfig.from_dict({**TINY, "plugins": {"mcis": {"pair_policy": "random"}}})
    assert fixed_data_path(random_mcis, ["base", "mcis"]) == "random"
    forced = TrainConfig.from_dict({**TINY, "pair_sampler": "random"})
    assert fixed_data_path(forced, ["base", "mcis"]) == "random"  # --pair-sampler wins
    base = subset_config(cfg, "base", Path("o"), 0, "share_one")
    assert base.plugins.enabled() == [] and pair_policy(base) == "share_one"
    assert pair_policy(subset_config(cfg, "base", Path("o"), 0)) is None  # per subset
    assert pair_policy(subset_config(forced, "mcis", Path("o"), 0)) == "random"
    note = data_path_note(False, "share_one", ["base", "mcis", "all"], cfg)
    assert "mcis, all trained on image pairs sharing a class" in note and "mixes" in note
