"""Typed settings shared by the gateway and the admin app."""

from config.load import ConfigError, load_config, parse_config
from config.model import Config, Route, Tier, Upstream
from config.settings import DEV_JWT_SECRET, Settings, load_settings

__all__ = [
    "DEV_JWT_SECRET",
    "Config",
    "ConfigError",
    "Route",
    "Settings",
    "Tier",
    "Upstream",
    "load_config",
    "load_settings",
    "parse_config",
]
