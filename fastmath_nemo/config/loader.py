"""Parse ``conf/NAME.yaml`` (with ``defaults:`` inheritance) and dotlist overrides into the
typed ``Config``: unknown keys, wrong types and values outside an enumeration fail here,
naming the key. What else must hold is checked by ``config/validate.py`` (what the config
alone decides) and ``fastmath_nemo.preflight`` (what this machine, the world size and the
implementations decide), which also loads: ``preflight.load_config`` is what callers use."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fastmath_nemo.config.errors import ConfigError
from fastmath_nemo.config.schema import Config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# OmegaConf's wording of a value outside an enumeration (the same in 2.3 and 2.4).
_NOT_A_CHOICE = re.compile(r"Invalid value '(?P<value>.*)', expected one of \[(?P<choices>.*)\]")


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
        # resolve=False: an override "${oc.env:TOKEN}" stays an interpolation (see to_yaml).
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]), resolve=False)["value"]
        OmegaConf.update(merged, re.sub(r"\[(\d+)\]", r".\1", key), value, merge=True)
    except OmegaConfBaseException as err:
        full = getattr(err, "full_key", None)  # deeper than the override's key: a list item
        raise ConfigError(f"config key '{full if isinstance(full, str) and full.startswith(key) else key}': "
                          f"{_reason(err)}") from None


def _reason(err: OmegaConfBaseException) -> str:
    reason = getattr(err, "msg", None) or str(err).splitlines()[0] or type(err).__name__
    if choice := _NOT_A_CHOICE.match(reason):  # worded as the other checks word a bad choice
        return f"{choice['value']!r} is not one of {choice['choices']}"
    return reason


def parse_config(name: str = "recipe", overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> Config:
    """Merge schema defaults <- conf/NAME.yaml (and its defaults) <- overrides, typed; not yet
    validated (``preflight.load_config`` parses and validates)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), _read_yaml(name, conf_dir))
    except OmegaConfBaseException as err:
        raise ConfigError(f"conf={name}: config key '{getattr(err, 'full_key', None)}': {_reason(err)}") from None
    for item in overrides or []:
        _apply_override(merged, item)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
        cfg.interpolations = {key: (written, _plain(merged, key)) for key, written in _interpolations(merged)}
    except OmegaConfBaseException as err:
        raise ConfigError(f"config key '{getattr(err, 'full_key', None)}': {_reason(err)}") from None
    return cfg


def _interpolations(node: DictConfig | ListConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, "${...}" as written) of every interpolated value under ``node``."""
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    found: list[tuple[str, str]] = []
    for key in keys:
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_interpolation(node, key):
            found.append((path, str(node._get_node(key)._value())))  # type: ignore[union-attr]
        else:
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                found += _interpolations(child, path)
    return found


def _plain(container: DictConfig, key: str) -> Any:
    """The resolved value at dotted ``key`` as plain Python (containers as dicts and lists)."""
    value = OmegaConf.select(container, key, throw_on_missing=True)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def to_yaml(cfg: Config) -> str:
    """``cfg`` as YAML, with every interpolation that still holds its load-time value written
    as written ("${oc.env:HF_TOKEN}", not the token): what a run writes to config.yaml."""
    out = OmegaConf.structured(cfg)
    for key, (written, loaded) in cfg.interpolations.items():
        if _plain(out, key) == loaded:  # a value changed in code since loading is written as is
            OmegaConf.update(out, key, written, merge=False, force_add=True)
    return OmegaConf.to_yaml(out)


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
