"""Configuration: the typed settings of a run, recipes, the command line, the plug-in section.

- settings.py: `TrainConfig` (every setting, its checks), what a resumed or stored run keeps;
- recipes.py: YAML recipes, `base:` chains, the dataset's default recipe, config.yaml;
- flags.py: train.py's command line;
- plugin_section.py: the `plugins:` section (every registered plug-in's settings).

The names most callers need are here.
"""

from toco.config.flags import build_parser, parse_config
from toco.config.recipes import CONFIG_DIR, config_json, load_recipe_chain, load_yaml, save_config
from toco.config.settings import (
    OFFICIAL_BEHAVIOUR,
    RESUMABLE_SETTINGS,
    TrainConfig,
    changed_settings,
    flat_settings,
    resumed_config,
)

__all__ = [
    "CONFIG_DIR",
    "OFFICIAL_BEHAVIOUR",
    "RESUMABLE_SETTINGS",
    "TrainConfig",
    "build_parser",
    "changed_settings",
    "config_json",
    "flat_settings",
    "load_recipe_chain",
    "load_yaml",
    "parse_config",
    "resumed_config",
    "save_config",
]
