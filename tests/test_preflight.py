"""``preflight``: parsing alone checks keys, types and choices; validation then adds what the
config alone decides, and what the world size and each implementation say."""

from __future__ import annotations

import pytest

from fastmath_nemo.config.errors import ConfigError
from fastmath_nemo.config.loader import parse_config
from fastmath_nemo.config.schema import PolicyBackend
from fastmath_nemo.preflight import load_config, validate


def test_parsing_checks_choices_and_nothing_an_implementation_knows() -> None:
    with pytest.raises(ConfigError, match="config key 'policy.backend': 'jax' is not one of torch, megatron"):
        parse_config("recipe", ["policy.backend=jax"])
    cfg = parse_config("recipe", ["grpo.rewards=[{name: nope}]"])  # the reward registry is not asked yet
    assert cfg.policy.backend is PolicyBackend.torch  # choices arrive as enumeration members
    with pytest.raises(ConfigError, match=r"config key 'grpo.rewards\[0\].name': 'nope' is not one of accuracy"):
        validate(cfg)


def test_the_world_size_is_checked_at_validation(monkeypatch) -> None:
    cfg = parse_config("recipe", ["grpo.prompts_per_step=3"])
    validate(cfg)  # one rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="'grpo.prompts_per_step': must be divisible by the number of ranks \\(2\\)"):
        validate(cfg)


def test_load_config_is_parse_then_validate() -> None:
    assert load_config("recipe", ["sft.epochs=2"]) == parse_config("recipe", ["sft.epochs=2"])
    with pytest.raises(ConfigError, match="'grpo.num_generations'"):
        load_config("recipe", ["grpo.num_generations=1"])
