"""docs/extending.md's example as written: a loss term in a module outside the repository,
trained with --plugin-module and evaluated from the stored config alone."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.fixtures import make_standard_voc_tree
from tests.test_cli import train_args
from toco.config import TrainConfig, load_recipe_chain, load_yaml, parse_config
from toco.errors import ConfigError
from toco.plugins.registry import unregister

ROOT = Path(__file__).resolve().parent.parent
MODULE = "absent_classes"


def documented_module() -> str:
    """The python block of docs/extending.md that starts with '# absent_classes.py'."""
    text = (ROOT / "docs" / "extending.md").read_text()
    found = re.search(r"```python\n(# absent_classes\.py.*?)```", text, re.DOTALL)
    assert found, "docs/extending.md lost its absent_classes.py example"
    return found.group(1)


@pytest.fixture(scope="module")
def ext_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user_ext")
    assert ROOT not in folder.resolve().parents  # really outside the repository
    (folder / f"{MODULE}.py").write_text(documented_module())
    return folder


@pytest.fixture
def imported(ext_dir, monkeypatch):
    """The example module importable in this process; its plug-in unregistered afterwards."""
    monkeypatch.syspath_prepend(str(ext_dir))
    yield
    unregister("absent")
    sys.modules.pop(MODULE, None)


def env_with(path: Path | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    return env


def run_script(
    script: str, argv: list[str], pythonpath: Path | None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *argv],
        cwd=ROOT,
        env=env_with(pythonpath),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_absent_class_mass_by_hand(imported):
    module = importlib.import_module(MODULE)
    labels = torch.tensor([[1.0, 0.0]])  # class 1 present, class 2 absent
    logits = torch.zeros(1, 3, 2, 2)  # uniform: each class 1/3 at every pixel
    assert module.absent_class_mass(logits, labels).item() == pytest.approx(1 / 3)
    logits[0, 2, 0, 0] = 50.0  # one pixel all on the absent class, the rest uniform
    assert module.absent_class_mass(logits, labels).item() == pytest.approx((1 + 3 * (1 / 3)) / 4)
    sharp = torch.zeros(1, 3, 1, 1)
    sharp[0, 2] = 2.0  # temperature 2: softmax of (0, 0, 1)
    e = torch.e
    assert module.absent_class_mass(sharp, labels, 2.0).item() == pytest.approx(e / (2 + e))


def test_flags_and_recipe_key_import_the_module(imported, tmp_path):
    cfg, _ = parse_config(["--plugin-module", MODULE, "--absent", "--absent-temperature", "2"])
    assert cfg.plugin_modules == (MODULE,)
    assert cfg.plugins.absent.enable and cfg.plugins.absent.temperature == 2.0
    with pytest.raises(ConfigError, match=r"absent-temperature\) must be > 0, got 0.0"):
        parse_config(["--plugin-module", MODULE, "--absent", "--absent-temperature", "0"])
    # A base recipe names the module; the recipe on top sets its settings; a flag adds one more.
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"base": "none", "plugin_modules": [MODULE]}))
    (tmp_path / "top.yaml").write_text(
        yaml.safe_dump(
            {"base": "base.yaml", "plugin_modules": [], "plugins": {"absent": {"weight": 0.3}}}
        )
    )
    cfg, _ = parse_config(["--config", str(tmp_path / "top.yaml"), "--plugin-module", "json"])
    assert cfg.plugin_modules == (MODULE, "json")
    assert cfg.plugins.absent.weight == 0.3
    assert [layer.path.name for layer in load_recipe_chain(str(tmp_path / "top.yaml"))] == [
        "base.yaml",
        "top.yaml",
    ]


def test_help_lists_the_module_flags(imported, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--plugin-module", MODULE, "--help"])
    shown = capsys.readouterr().out
    assert "plug-in absent" in shown and "--absent-temperature" in shown


STORED_PLUGIN = """
from dataclasses import dataclass
from toco.plugins.registry import Plugin, PluginSettings, register, setting

@dataclass
class StoredSettings(PluginSettings):
    level: int = setting(1, "a number")

register(Plugin("stored_only", StoredSettings, "test plug-in", lambda settings, ctx: []))
"""


def test_a_saved_config_imports_its_modules(tmp_path, monkeypatch):
    """What an ablation's child process does: a saved config.yaml names a module that is not
    imported yet; reading it imports the module before the plug-in section is read."""
    (tmp_path / "stored_ext_mod.py").write_text(STORED_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = tmp_path / "config.yaml"
    saved.write_text(
        yaml.safe_dump(
            {
                "plugin_modules": ["stored_ext_mod"],
                "plugins": {"stored_only": {"enable": True, "level": 3}},
            }
        )
    )
    assert "stored_ext_mod" not in sys.modules
    try:
        cfg = TrainConfig.from_dict(load_yaml(str(saved)), str(saved))
        assert cfg.plugins.stored_only.level == 3 and cfg.plugins.enabled() == ["stored_only"]
        assert TrainConfig.from_saved(cfg.to_dict()).plugin_modules == ("stored_ext_mod",)
    finally:
        unregister("stored_only")
        sys.modules.pop("stored_ext_mod", None)


def test_bad_module_names_are_one_line_errors(tmp_path):
    with pytest.raises(
        ConfigError, match="plug-in module 'no_such_module_xyz' cannot be imported.*PYTHONPATH"
    ):
        parse_config(["--plugin-module", "no_such_module_xyz"])
    with pytest.raises(ConfigError, match="not a module name"):
        TrainConfig.from_dict({"plugin_modules": ["bad/name.py"]})
    broken = tmp_path / "broken_ext_mod.py"
    broken.write_text("raise RuntimeError('boom')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(
            ConfigError,
            match=r"'broken_ext_mod' cannot be imported: "
            r"RuntimeError: boom$",
        ):
            parse_config(["--plugin-module", "broken_ext_mod"])
    finally:
        sys.path.remove(str(tmp_path))


def test_train_with_the_module_then_evaluate_without_the_flag(ext_dir, tmp_path):
    root = make_standard_voc_tree(tmp_path / "VOC2012")
    work = tmp_path / "run"
    argv = train_args(
        root,
        work,
        "--max-iters",
        "2",
        "--seg-start-iter",
        "0",
        "--warmup-iters",
        "1",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--log-every",
        "1",
        "--plugin-module",
        MODULE,
        "--absent",
        "--absent-weight",
        "0.5",
        "--absent-start-iter",
        "0",
    )
    trained = run_script("train.py", argv, ext_dir)
    assert trained.returncode == 0, trained.stderr
    stored = yaml.safe_load((work / "config.yaml").read_text())
    assert stored["plugin_modules"] == [MODULE]
    assert stored["plugins"]["absent"]["enable"] is True
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    absent = [rec["absent"] for rec in logged if "absent" in rec]
    assert absent and all(0.0 <= v <= 1.0 for v in absent)

    checkpoint = str(work / "checkpoints" / "last.pt")
    scores = tmp_path / "scores.json"
    evaluated = run_script(
        "evaluate.py",
        ["--checkpoint", checkpoint, "--workers", "0", "--output-json", str(scores)],
        ext_dir,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert 0.0 <= json.loads(scores.read_text())["miou"] <= 100.0

    # Without the module on the path the stored config names what is missing, in one line.
    missing = run_script("evaluate.py", ["--checkpoint", checkpoint, "--workers", "0"], None)
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and f"plug-in module '{MODULE}' cannot be imported" in lines[0]
