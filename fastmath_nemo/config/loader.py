"""Load ``conf/NAME.yaml`` (with ``defaults:`` inheritance), apply dotlist overrides, and
validate into the typed ``Config`` before any work starts."""

from __future__ import annotations

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


def load_config(name: str = "recipe", overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> Config:
    """Merge schema defaults <- conf/NAME.yaml (and its defaults) <- overrides; validate."""
    try:
        schema = OmegaConf.structured(Config)
        merged = OmegaConf.merge(schema, _read_yaml(name, conf_dir))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"config key '{key}': {err.msg if hasattr(err, 'msg') else err}") from None
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
