"""Load ``conf/NAME.yaml`` (with ``defaults:`` inheritance), apply dotlist overrides, and
validate into the typed ``Config`` before any work starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fastmath_nemo.config.schema import Config
from fastmath_nemo.config.validate import validate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


def _read_yaml(name_or_path: str, conf_dir: Path, chain: tuple[str, ...] = ()) -> DictConfig:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = conf_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in conf_dir.glob("*.yaml"))
        raise ConfigError(f"conf={name_or_path}: no such file {path} (available: {', '.join(available)})")
    if str(path) in chain:
        raise ConfigError(f"conf: 'defaults' cycle through {path}")
    raw = OmegaConf.load(path)
    parents = raw.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, _read_yaml(str(parent), path.parent, chain + (str(path),)))
    return OmegaConf.merge(merged, raw)


def _apply_override(merged: DictConfig, item: str) -> None:
    """``key.sub=value`` or ``key.list[1].sub=value``; values parse as YAML, as in OmegaConf dotlists."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value")
    try:
        value = OmegaConf.from_dotlist([f"value={raw}"])["value"]
        OmegaConf.update(merged, re.sub(r"\[(\d+)\]", r".\1", key), value, merge=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config key '{key}': {_reason(err)}") from None


def _reason(err: OmegaConfBaseException) -> str:
    return getattr(err, "msg", None) or str(err).splitlines()[0] or type(err).__name__


def load_config(name: str = "recipe", overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> Config:
    """Merge schema defaults <- conf/NAME.yaml (and its defaults) <- overrides; validate."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), _read_yaml(name, conf_dir))
    except OmegaConfBaseException as err:
        raise ConfigError(f"conf={name}: config key '{getattr(err, 'full_key', None)}': {_reason(err)}") from None
    for item in overrides or []:
        _apply_override(merged, item)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(f"config key '{getattr(err, 'full_key', None)}': {_reason(err)}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
