"""Recipes that inherit (`base:`), and resuming a run that never mixes two runs' settings."""

from __future__ import annotations

import pytest
import yaml

import train
from tests.test_cli import run, train_args
from toco.checkpoint import load_checkpoint
from toco.config import CONFIG_DIR, parse_config
from toco.errors import ConfigError


def write(path, text: str):
    path.write_text(text)
    return str(path)


def test_base_settings_are_overridden_by_the_recipe_and_flags(tmp_path):
    base = write(tmp_path / "base.yaml", "dataset: voc\nw_seg: 0.3\nw_ptc: 0.4\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nw_seg: 0.7\n")
    cfg, _ = parse_config(["--config", child, "--w-ptc", "0.9", "--data-root", "x"])
    assert (cfg.w_seg, cfg.w_ptc) == (0.7, 0.9)
    # the VOC recipe sits under the chain's root, which names no base
    assert cfg.image_labels == "annotations" and cfg.loss_group_size == 2
    assert cfg.recipe == f"configs/voc_vit_b.yaml + {base} + {child}"


def test_chain_resolves_bases_next_to_the_file_then_in_configs(tmp_path):
    (tmp_path / "sub").mkdir()
    middle = write(tmp_path / "sub" / "middle.yaml", "base: voc_deit_b.yaml\nmax_iters: 7\n")
    top = write(tmp_path / "top.yaml", "base: sub/middle.yaml\nlr: 0.5\n")
    cfg, _ = parse_config(["--config", top, "--data-root", "x"])
    assert cfg.backbone.startswith("deit_base") and cfg.max_iters == 7 and cfg.lr == 0.5
    assert cfg.recipe.split(" + ") == [
        "configs/voc_vit_b.yaml",
        "configs/voc_deit_b.yaml",
        middle,
        top,
    ]


def test_run_config_names_the_chain_and_reloads_to_the_same_settings(tmp_path, capsys):
    child = write(tmp_path / "child.yaml", "base: voc_vit_b.yaml\nw_seg: 0.7\n")
    cfg, _ = parse_config(["--config", child, "--data-root", "x"])
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    again, _ = parse_config(["--config", str(saved)])
    assert {**again.to_dict(), "recipe": None} == {**cfg.to_dict(), "recipe": None}
    assert "warning" not in capsys.readouterr().err  # a resolved config sets everything


def test_a_cycle_is_refused_in_one_line(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    b = write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(
        ConfigError, match="recipe bases form a cycle: .*b.yaml -> .*a.yaml -> .*b.yaml"
    ) as err:
        parse_config(["--config", b, "--data-root", "x"])
    assert "\n" not in str(err.value)


def test_a_missing_base_is_named(tmp_path):
    child = write(tmp_path / "child.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"child.yaml: base recipe 'nowhere.yaml' not found"):
        parse_config(["--config", child, "--data-root", "x"])


def test_a_recipe_without_base_is_warned_about_what_it_inherits(tmp_path, capsys):
    mine = write(tmp_path / "mine.yaml", "dataset: voc\nmax_iters: 10\n")
    cfg, _ = parse_config(["--config", mine, "--data-root", "x"])
    err = capsys.readouterr().err
    assert "names no base recipe" in err and "configs/voc_vit_b.yaml" in err
    for setting in ("image_labels=annotations", "input_norm=imagenet", "loss_group_size=2"):
        assert setting in err
    assert cfg.image_labels == "annotations"


def test_base_none_starts_from_the_builtin_defaults_and_names_what_it_drops(tmp_path, capsys):
    mine = write(tmp_path / "mine.yaml", "base: none\ndataset: voc\ninput_norm: imagenet\n")
    cfg, _ = parse_config(["--config", mine, "--data-root", "x"])
    err = capsys.readouterr().err
    assert "starts from the built-in defaults" in err
    assert "image_labels=annotations" in err and "input_norm" not in err  # it sets that one
    assert cfg.image_labels == "masks" and cfg.loss_group_size == 0
    assert cfg.recipe == mine


def test_shipped_recipes_give_no_warning(capsys):
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        parse_config(["--config", str(path), "--data-root", "x"])
    assert capsys.readouterr().err == ""


@pytest.fixture()
def unfinished(tmp_path):
    """A tiny VOC run stopped at iteration 2 of 4 (checkpoint written, no COMPLETE)."""
    from tests.fixtures import make_standard_voc_tree

    root = make_standard_voc_tree(tmp_path / "VOC2012")
    work = tmp_path / "run"
    common = [
        "--seg-start-iter",
        "1",
        "--warmup-iters",
        "2",
        "--eval-every",
        "100",
        "--log-every",
        "1",
        "--preview-images",
        "0",
    ]
    assert run(train, train_args(root, work, "--max-iters", "4", "--stop-at", "2", *common)) == 0
    assert not (work / "COMPLETE").exists()
    return root, work, common


def test_resume_with_a_changed_loss_weight_is_refused(unfinished, capsys):
    root, work, common = unfinished
    before = (work / "config.yaml").read_text()
    assert run(train, train_args(root, work, "--max-iters", "4", "--w-seg", "0.5", *common)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds an unfinished run with other settings (w_seg: 0.1 -> 0.5)" in err
    assert "--resume" in err and "--work-dir" in err and len(err.splitlines()) == 1
    assert (work / "config.yaml").read_text() == before  # nothing rewritten
    assert load_checkpoint(work / "checkpoints" / "last.pt")["iteration"] == 2


def test_resume_accepts_a_longer_run(unfinished):
    root, work, common = unfinished
    assert run(train, train_args(root, work, "--max-iters", "3", *common)) == 0
    assert load_checkpoint(work / "checkpoints" / "last.pt")["iteration"] == 3
    assert yaml.safe_load((work / "config.yaml").read_text())["max_iters"] == 3


def test_explicit_resume_keeps_the_stored_settings(unfinished):
    root, work, common = unfinished
    assert (
        run(
            train,
            train_args(root, work, "--max-iters", "3", "--w-seg", "0.5", *common) + ["--resume"],
        )
        == 0
    )
    stored = yaml.safe_load((work / "config.yaml").read_text())
    assert stored["w_seg"] == 0.1 and stored["max_iters"] == 3
    assert "keeping the stored run's w_seg=0.1 (not 0.5)" in (work / "train.log").read_text()
