"""Recipes: YAML files of settings, their `base:` chains, the dataset's default recipe, and the
config.yaml a run writes.

Precedence: TrainConfig defaults < the dataset's recipe < `--config` and its bases < flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from toco import schema
from toco.config.plugin_section import PluginSet, flatten_plugin_values
from toco.config.settings import FIELDS, TrainConfig, coerce_settings
from toco.errors import ConfigError
from toco.plugins.registry import MODULES_KEY, import_plugin_modules

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def load_yaml(path: str) -> dict[str, Any]:
    """Read a recipe file: a flat mapping of setting → value."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of settings, got {type(data).__name__}"
        )
    return data


def resolve_recipes(
    config: Optional[str], flags: dict[str, Any], layers: Optional[list["RecipeLayer"]] = None
) -> tuple[dict[str, Any], list[Path], list[str]]:
    """The settings of `--config` and its bases, over the dataset's default recipe.

    Returns (values, the recipe files in the order applied, warnings). A recipe names its base
    with `base: FILE` (resolved relative to the recipe, then to configs/) or `base: none` (start
    from the built-in defaults); a recipe without `base:` sits on its dataset's default recipe
    (ToCo's VOC/COCO run, the demo), which a warning spells out for recipes outside configs/.
    `layers`: the chain of `config` when already loaded. The `plugin_modules` of every file
    are kept (a base's plug-in settings need its modules), not replaced.
    """
    if layers is None:
        layers = load_recipe_chain(config) if config else []
    first = layers[0] if layers else None
    own = _merged(layers)
    dataset = flags.get("dataset", own.get("dataset", schema.default_of(TrainConfig, "dataset")))
    default_path, defaults = dataset_recipe(dataset)
    warnings: list[str] = []
    # The recipe settings this file leaves to others and that differ from the built-in defaults.
    unset = {
        k: v
        for k, v in defaults.items()
        if k not in own and k not in flags and _plain(v) != _plain(_default_of(k))
    }
    if first is not None and first.base == "none":
        if unset:
            warnings.append(
                f"{first.path} starts from the built-in defaults (base: none), not "
                f"from {display_path(str(default_path))}; it does not set "
                f"{_listing(unset)}"
            )
        defaults, default_path = {}, None
    elif first is not None and unset and not _inside(first.path, CONFIG_DIR):
        warnings.append(
            f"{first.path} names no base recipe, so the settings it does not set "
            f"come from {display_path(str(default_path))}, among them "
            f"{_listing(unset)} (write `base: {default_path.name}` to say so, or "
            "`base: none` to start from the built-in defaults)"
        )
    chain = [layer.path for layer in layers]
    if default_path is not None and all(p.resolve() != default_path.resolve() for p in chain):
        chain.insert(0, default_path)
    files = (defaults, *(layer.values for layer in layers))
    modules = union_of_names(*(values.get(MODULES_KEY, ()) for values in files))
    return {**defaults, **own, MODULES_KEY: modules}, chain, warnings


def union_of_names(*lists: Sequence[str]) -> tuple[str, ...]:
    """The names of all lists in first-seen order."""
    return tuple(dict.fromkeys(name for names in lists for name in names))


@dataclass(frozen=True)
class RecipeLayer:
    """One recipe file of a chain: its path, its `base:` entry (None, "none" or a file name)
    and its own settings."""

    path: Path
    base: Optional[str]
    values: dict[str, Any]


def load_recipe_chain(path: str) -> list[RecipeLayer]:
    """The recipe at `path` and its bases, root first; a cycle or a missing base is refused.

    Every file's `plugin_modules` are imported before any file's settings are read (a recipe
    may set plug-in values of a module its base names)."""
    raw_layers: list[tuple[Path, Optional[str], dict[str, Any]]] = []
    current: Optional[Path] = Path(path)
    seen: list[Path] = []
    while current is not None:
        resolved = current.resolve()
        if resolved in seen:
            names = " -> ".join(str(p) for p in [*seen, resolved])
            raise ConfigError(f"{path}: recipe bases form a cycle: {names}")
        seen.append(resolved)
        raw = dict(load_yaml(str(current)))
        raw.pop("recipe", None)  # a saved config.yaml used as a recipe
        base = raw.pop("base", None)
        base = None if base is None else str(base)
        raw_layers.append((current, base, raw))
        current = None if base is None or base.lower() == "none" else _find_base(base, current)
    raw_layers.reverse()
    for recipe, _, raw in raw_layers:
        import_plugin_modules(raw.get(MODULES_KEY, ()), str(recipe))
    return [
        RecipeLayer(recipe, base, coerce_settings(raw, str(recipe)))
        for recipe, base, raw in raw_layers
    ]


def _find_base(base: str, recipe: Path) -> Path:
    for candidate in (recipe.parent / base, CONFIG_DIR / base):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"{recipe}: base recipe '{base}' not found (looked in {recipe.parent} "
        f"and {display_path(str(CONFIG_DIR))}/)"
    )


def _merged(layers: list[RecipeLayer]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        out.update(layer.values)
    return out


def _default_of(key: str) -> Any:
    if key not in FIELDS:  # a plug-in setting `plugins.<name>.<setting>`: the registry's default
        return flatten_plugin_values(PluginSet().to_dict()).get(key)
    return schema.default_of(TrainConfig, key)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _listing(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_yaml_value(v)}" for k, v in values.items())


def _yaml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def display_path(path: str) -> str:
    """Recipe paths inside the project are shown relative to it."""
    try:
        return str(Path(path).resolve().relative_to(CONFIG_DIR.parent))
    except ValueError:
        return path


def dataset_recipe(dataset: str) -> tuple[Optional[Path], dict[str, Any]]:
    """The dataset's default recipe (the synthetic demo, ToCo's VOC or COCO run): its path and
    settings, or (None, {}) when it has none."""
    from datasets import get_dataset_spec  # late: datasets depends on toco.errors only

    recipe = get_dataset_spec(dataset).default_recipe
    if recipe is None:
        return None, {}
    path = CONFIG_DIR / recipe
    return path, coerce_settings(load_yaml(str(path)), str(path))


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)
