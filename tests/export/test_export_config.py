"""conf/export.yaml's settings that cannot run stop at start-up, naming the key."""

from __future__ import annotations

import pytest

from fastmath_nemo.preflight import ConfigError, load_config


@pytest.mark.parametrize(("overrides", "message"), [
    (["export.format=onnx"], "config key 'export.format': 'onnx' is not one of hf, megatron, nemo"),
    (["export.dtype=int8"], "config key 'export.dtype': 'int8' is not one of float32, bfloat16, float16"),
    (["export.checkpoint=null"], "config key 'export.checkpoint': stage=export needs the checkpoint"),
    (["export.dir=null"], "config key 'export.dir': stage=export needs the folder to write"),
])
def test_impossible_export_settings_name_their_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("export", overrides)


def test_export_refuses_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="config key 'stage': export runs in one process"):
        load_config("export")


def test_export_yaml_defaults() -> None:
    cfg = load_config("export")
    assert (cfg.stage, cfg.export.format, cfg.export.dtype) == ("export", "hf", None)
    assert cfg.export.checkpoint == "runs/recipe/grpo/final" and cfg.export.dir == "runs/recipe/export/hf"
