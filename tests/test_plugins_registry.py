"""The plug-in registry: a plug-in defined outside the package gets flags, a YAML section,
validation, training and checkpoints; recipes and checkpoints with the older flat keys load."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import yaml

from toco.config import TrainConfig, parse_config, save_config
from toco.config.plugin_section import enabled_in
from toco.errors import ConfigError
from toco.method.step import LossModule, StepState
from toco.plugins.registry import (
    BuildContext,
    Plugin,
    PluginSettings,
    register,
    registered,
    setting,
    unregister,
)


@dataclass
class ToySettings(PluginSettings):
    weight: float = setting(1.0, "weight of the toy loss")
    scale: float = setting(2.0, "multiplies the squared mean logit")
    mode: str = setting("square", "what the toy loss does", ["square", "abs"])
    sizes: tuple = setting((1, 2), "two numbers", elem=int)

    def check(self, cfg, need, key) -> None:
        need(self.scale > 0, f"{key('scale')} must be > 0, got {self.scale}")


class ToyLoss(LossModule):
    """scale * (mean logit + b)^2 with a learnable b; counts its calls in a buffer."""

    names = ("toy",)

    def __init__(self, settings: ToySettings, ctx: BuildContext) -> None:
        super().__init__(settings.weight, settings.start(ctx.cfg))
        self.scale = settings.scale
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def compute(self, state: StepState) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"toy": self.scale * (state.logits.float().mean() + self.bias) ** 2}


@pytest.fixture
def toy():
    register(
        Plugin(
            "toy",
            ToySettings,
            "toy: an extra loss defined in a test",
            lambda s, ctx: [ToyLoss(s, ctx)],
        )
    )
    yield
    unregister("toy")


def test_a_plugin_defined_outside_the_package_gets_flags_and_a_yaml_section(toy, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"plugins": {"toy": {"enable": True, "scale": 4.0, "sizes": [3, 4]}}})
    )
    cfg, _ = parse_config(["--config", str(recipe), "--toy-mode", "abs"])
    assert cfg.plugins.toy == ToySettings(enable=True, scale=4.0, mode="abs", sizes=(3, 4))
    cfg, _ = parse_config(["--config", str(recipe), "--toy-scale", "5", "--no-toy"])
    assert cfg.plugins.toy.scale == 5.0 and not cfg.plugins.toy.enable
    cfg, _ = parse_config(["--toy", "--w-toy", "0.5", "--plugin-start-iter", "3"])
    assert (cfg.plugins.toy.weight, cfg.plugins.toy.start(cfg)) == (0.5, 3)
    assert cfg.plugins.enabled() == ["toy"]
    saved = tmp_path / "saved.yaml"  # the resolved config round-trips through its own YAML
    save_config(cfg, saved)
    assert TrainConfig.from_dict(yaml.safe_load(saved.read_text())) == cfg
    with pytest.raises(ConfigError, match=r"plugins.toy.scale \(--toy-scale\) must be > 0"):
        parse_config(["--toy", "--toy-scale", "0"])
    with pytest.raises(ConfigError, match="invalid choice"):
        parse_config(["--toy-mode", "cube"])
    recipe.write_text(yaml.safe_dump({"plugins": {"toy": {"scael": 1.0}}}))
    with pytest.raises(ConfigError, match="unknown setting of plug-in toy 'scael'.*scale"):
        parse_config(["--config", str(recipe)])
    recipe.write_text(yaml.safe_dump({"plugins": {"tyo": {"enable": True}}}))
    with pytest.raises(ConfigError, match="unknown plug-in 'tyo'.*toy"):
        parse_config(["--config", str(recipe)])


def test_a_plugin_defined_outside_the_package_trains_and_resumes(toy, tmp_path):
    import train
    from tests.fixtures import make_standard_voc_tree
    from tests.test_cli import run, train_args
    from toco.checkpoint import load_checkpoint

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    work = tmp_path / "run"
    common = [
        "--toy",
        "--toy-scale",
        "3",
        "--plugin-start-iter",
        "0",
        "--log-every",
        "1",
        "--threads",
        "1",
        "--eval-every",
        "100",
    ]
    assert run(train, train_args(root, work, "--max-iters", "2", *common)) == 0
    ckpt = load_checkpoint(work / "checkpoints" / "last.pt")
    assert ckpt["config"]["plugins"]["toy"]["scale"] == 3.0
    toy_state = {
        k: v for k, v in ckpt["trainer"]["loss_modules"].items() if k.endswith(("calls", "bias"))
    }
    (calls,) = [v for k, v in toy_state.items() if k.endswith("calls")]
    (bias,) = [v for k, v in toy_state.items() if k.endswith("bias")]
    assert int(calls) == 2 and float(bias) != 0.0  # trained by the optimizer
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "toy" in r]) == 2
    # resume: the buffer continues from the checkpoint
    assert run(train, train_args(root, work, "--max-iters", "3", "--resume", *common)) == 0
    ckpt = load_checkpoint(work / "checkpoints" / "last.pt")
    (calls,) = [v for k, v in ckpt["trainer"]["loss_modules"].items() if k.endswith("calls")]
    assert int(calls) == 3
    assert enabled_in(ckpt["config"]) == ["toy"]


# plug-in settings that did not exist when the settings were flat keys of the core config
ADDED_SINCE = {
    ("ppc", "semi_hard_window"),
    ("ppc", "ema_momentum"),
    ("rca", "aggregation_insert"),
    ("mcis", "self_pairs"),
    ("mcis", "co_cam"),
    ("mcis", "co_cam_fuse"),
    ("mcis", "co_cam_start_iter"),
    ("ppc", "start_iter"),
    ("rca", "start_iter"),
    ("mcis", "start_iter"),
    ("ppc", "semi_hard_min_first"),
    ("rca", "fusion"),
    ("rca", "coarse_head"),
    ("rca", "w_coarse"),
    ("rca", "coarse_pool"),
    ("rca", "enqueue_score"),
    ("rca", "mixup_partner"),
    ("mcis", "co_cam_partners"),
    ("mcis", "co_cam_num_partners"),
    ("mcis", "co_cam_bank_size"),
    ("mcis", "co_cam_self_views"),
    ("mcis", "co_cam_score_thr"),
    ("mcis", "co_cam_normalise"),
}


# defaults changed since (a config of that time stored the old value)
OLD_DEFAULTS = {
    ("rca", "mask_source"): "pseudo_label",
    ("rca", "mixup_p"): 0.5,
    ("ppc", "proto_scope"): "gather",
    ("ppc", "bkg_thre"): None,
    ("mcis", "co_cam"): "off",
}


# settings renamed since (one spelling per concept): their name in configs of that time
RENAMED = {("ppc", "bkg_thre"): "bg_thr", ("rca", "w_coarse"): "coarse_weight"}


def _flat(cfg: TrainConfig) -> dict:
    """The config dict as the code before the registry wrote it: one flat key per setting."""
    out = cfg.to_dict()
    for name, values in out.pop("plugins").items():
        for key, value in values.items():
            if (name, key) in ADDED_SINCE:
                continue
            value = OLD_DEFAULTS.get((name, key), value)
            key = RENAMED.get((name, key), key)
            out[{"enable": name, "weight": f"w_{name}"}.get(key, f"{name}_{key}")] = value
    out["plugin_start_iter"] = 5
    return out


def test_older_flat_keys_load_into_the_plugin_sections():
    cfg = TrainConfig.from_dict(
        {
            "ppc": True,
            "w_ppc": 0.2,
            "ppc_tau": 0.3,
            "rca_dim": 16,
            "rca_mem_size": 8,
            "rca_num_centroids": 2,
            "plugin_start_iter": 5,
            "mcis_pool": "gmp",
            "plugins": {"rca": {"start_iter": 9}},
        }
    )
    assert cfg.plugins.ppc.enable and cfg.plugins.ppc.weight == 0.2
    assert cfg.plugins.ppc.tau == 0.3 and cfg.plugins.rca.dim == 16
    assert cfg.plugins.mcis.pool == "gmp"
    assert [cfg.plugins[n].start_iter for n in ("ppc", "rca", "mcis")] == [5, 9, 5]
    old = _flat(TrainConfig.from_dict({"rca": True, "rca_dim": 8, "mcis_w_co": 2.0}))
    assert "plugins" not in old and old["rca_dim"] == 8
    again = TrainConfig.from_dict(old, "checkpoint config")
    assert again.plugins.rca.enable and again.plugins.mcis.w_co == 2.0
    assert enabled_in(old) == ["rca"]
    # a setting added since keeps the stored run's behaviour when asked (TrainConfig.from_saved)
    from toco.config.plugin_section import plugin_values_before

    before = plugin_values_before(old)
    assert before == {
        "plugins.ppc.semi_hard_window": "absolute",
        "plugins.ppc.semi_hard_min_first": 0,
        "plugins.rca.fusion": "gate",
        "plugins.rca.coarse_head": False,
        "plugins.rca.enqueue_score": "logits",
        "plugins.rca.mixup_partner": "region",
        "plugins.mcis.co_cam_partners": "in_batch",
        "plugins.mcis.co_cam_normalise": False,
    }
    assert TrainConfig.from_dict({**before, **old}).plugins.ppc.semi_hard_window == "absolute"
    assert plugin_values_before(again.to_dict()) == {}  # written with every setting
    with pytest.raises(
        ConfigError, match="'ppc_semi_hard_top' is no longer a setting.*'plugins.ppc' section"
    ):
        TrainConfig.from_dict({"ppc_semi_hard_top": 3})


def test_renamed_settings_still_load_from_yaml_flags_and_stored_configs(tmp_path):
    """PPC bg_thr -> bkg_thre (ToCo's name), RCA coarse_weight -> w_coarse (the w_ loss-weight
    names): every earlier spelling still reads, and configs are written with the new one."""
    section = TrainConfig.from_dict(
        {"plugins": {"ppc": {"bg_thr": 0.3}, "rca": {"coarse_weight": 0.7}}}
    )
    flat = TrainConfig.from_dict({"ppc_bg_thr": 0.3, "rca_coarse_weight": 0.7})
    dotted = TrainConfig.from_dict({"plugins.ppc.bg_thr": 0.3, "plugins.rca.coarse_weight": 0.7})
    recipe = tmp_path / "old.yaml"
    recipe.write_text("plugins:\n  ppc: {enable: true, bg_thr: 0.3}\n  rca: {coarse_weight: 0.7}\n")
    from_yaml = parse_config(["--config", str(recipe)])[0]
    flags = parse_config(["--ppc-bg-thr", "0.3", "--rca-coarse-weight", "0.7"])[0]
    new_flags = parse_config(["--ppc-bkg-thre", "0.3", "--rca-w-coarse", "0.7"])[0]
    for cfg in (section, flat, dotted, from_yaml, flags, new_flags):
        assert (cfg.plugins.ppc.bkg_thre, cfg.plugins.rca.w_coarse) == (0.3, 0.7)
    stored = from_yaml.to_dict()["plugins"]
    assert "bkg_thre" in stored["ppc"] and "bg_thr" not in stored["ppc"]
    assert "w_coarse" in stored["rca"] and "coarse_weight" not in stored["rca"]
    assert TrainConfig.from_saved({"plugins": {"ppc": {"bg_thr": 0.1}}}).plugins.ppc.bkg_thre == 0.1
    with pytest.raises(ConfigError, match="bad value 'x' for 'plugins.ppc.bg_thr'"):
        TrainConfig.from_dict({"plugins": {"ppc": {"bg_thr": "x"}}})


def test_the_builtin_plugins_are_registered_in_order():
    assert list(registered())[:3] == ["ppc", "rca", "mcis"]
    cfg = TrainConfig()
    assert cfg.plugins.enabled() == [] and cfg.plugins.rca.mem_size == 500
    other = TrainConfig()
    other.plugins.rca.mem_size = 7  # configs never share their plug-in settings
    assert cfg.plugins.rca.mem_size == 500
