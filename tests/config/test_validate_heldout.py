"""Start-up checks of GRPO's held-out evaluation / kept checkpoint and of the metric sinks."""

from __future__ import annotations

import importlib.util

import pytest

from fastmath_nemo.preflight import ConfigError, load_config


def _raises(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config("recipe", overrides)
    return str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["grpo.keep=first"], "grpo.keep", "last, best"),
        (["grpo.keep=best", "grpo.eval_every_steps=0"], "grpo.keep", "eval_every_steps > 0"),
        (["grpo.eval_every_steps=-1"], "grpo.eval_every_steps", ">= 0"),
        (["grpo.keep_tolerance=1.5"], "grpo.keep_tolerance", "[0, 1]"),
        (["grpo.keep_tokens_tolerance=-0.1"], "grpo.keep_tokens_tolerance", "[0, 1]"),
        (["grpo.eval_every_steps=5", "grpo.heldout_problems=0"], "grpo.heldout_problems", "> 0"),
        (["grpo.eval_every_steps=5", "grpo.heldout_n_samples=0"], "grpo.heldout_n_samples", "> 0"),
        (["grpo.eval_every_steps=5", "grpo.heldout_token_budget=0"], "grpo.heldout_token_budget", "> 0"),
        (["run.loggers=[jsonl,mlflow]"], "run.loggers[1]", "jsonl, tensorboard, wandb"),
        (["run.loggers=[tensorboard]"], "run.loggers", "must include jsonl"),
    ],
)
def test_bad_settings_name_their_key(overrides, key, words):
    message = _raises(overrides)
    assert f"'{key}'" in message and words in message


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_sink_package_fails_with_the_install_command(monkeypatch, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    message = _raises([f"run.loggers=[jsonl,{package}]"])
    assert "'run.loggers[1]'" in message and f"pip install {package}" in message


def test_recipe_defaults_choose_the_best_step_on_a_held_out_slice():
    cfg = load_config("recipe", [])
    assert cfg.grpo.keep == "best" and cfg.grpo.eval_every_steps > 0 and cfg.run.loggers == ["jsonl"]
