"""The one error a configuration that cannot run raises, wherever it is found to be so."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


def config_error(key: str, message: str) -> ConfigError:
    """``config key '<key>': <message>``, the form every check words its error in."""
    return ConfigError(f"config key '{key}': {message}")
