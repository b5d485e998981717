"""Config: defaults < YAML recipe < flags; bad input is a ConfigError naming the setting."""

import pytest

from toco.config import TrainConfig, parse_config
from toco.errors import ConfigError


def test_no_arguments_give_the_synthetic_demo_recipe():
    from toco.config import CONFIG_DIR, load_yaml

    cfg, _ = parse_config([])
    expected = TrainConfig.from_dict(
        {**load_yaml(str(CONFIG_DIR / "synthetic.yaml")), "recipe": "configs/synthetic.yaml"}
    )
    assert cfg == expected
    assert cfg.dataset == "synthetic" and cfg.backbone_depth == 4


def test_yaml_supplies_defaults_and_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1.0e-4\nmax-iters: 77\ncam_scales: [1.0, 0.5]\nreference_quirks: true\n")
    cfg, _ = parse_config(["--config", str(recipe), "--max-iters", "5", "--w-ptc", "0.3"])
    assert cfg.lr == 1e-4 and cfg.max_iters == 5 and cfg.w_ptc == 0.3
    assert cfg.cam_scales == (1.0, 0.5) and cfg.reference_quirks is True


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_iter: 10\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_iter'.*max_iters"):
        parse_config(["--config", str(recipe)])


@pytest.mark.parametrize(
    "text, match",
    [
        ("- a\n- b\n", "must hold a mapping"),
        ("lr: [oops\n", "not valid YAML"),
        ("lr: fast\n", "bad value 'fast' for 'lr'"),
        ("reference_quirks: maybe\n", "bad value"),
    ],
)
def test_malformed_recipe(tmp_path, text, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_config(["--config", str(recipe)])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--dataset", "imagenet"], "invalid choice"),
        (["--batch-size", "0"], "batch_size must be positive"),
        (["--lr", "abc"], "invalid float value"),
        (["--low-thre", "0.8", "--high-thre", "0.7"], "low_thre <= high_thre"),
        (["--dataset", "voc"], "--data-root is required"),
        (["--config", "/no/such/file.yaml"], "config file not found"),
    ],
)
def test_bad_flags(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_roundtrip_through_dict():
    cfg = TrainConfig(max_iters=3, cam_scales=(1.0,)).validate()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
    assert recipes
    for recipe in recipes:
        cfg, _ = parse_config(["--config", str(recipe), "--data-root", "/data"])
        assert cfg.max_iters > 0
