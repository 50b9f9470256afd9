"""
Configuration: TOML loading, validation, frozen results.
"""

from harmony.config.errors import ConfigError
from harmony.config.loader import HarmonyConfig, load_config
from harmony.config.schema import Options

__all__ = ["ConfigError", "HarmonyConfig", "Options", "load_config"]
