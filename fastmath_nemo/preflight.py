"""Everything checked before work starts, so that an impossible run fails in seconds, naming the key.

:func:`load_config` parses (``config/loader.py``: keys, types, choices) and :func:`validate`s:
first what the configuration alone decides (``config/validate.py``), then what depends on
this machine, on the world size and on each implementation, asked through what that
implementation exports: the reward registry, the chat template compiler, the megatron
backend's layer-spec choice, vLLM's engine layout, the presets, the metric sinks and the
export formats. ``config/`` imports none of them; this module sits above them all.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fastmath_nemo.config.errors import ConfigError, config_error
from fastmath_nemo.config.loader import CONF_DIR, parse_config
from fastmath_nemo.config.schema import Config, GenerationBackend, PolicyBackend, RewardSpec, Stage
from fastmath_nemo.config.validate import check_config
from fastmath_nemo.data.chat import ChatTemplateError, check_chat_template, resolve_chat_template
from fastmath_nemo.export import export_format_error
from fastmath_nemo.generation.vllm_distributed import engine_layout_error
from fastmath_nemo.generation.vllm_generator import VLLMUnavailableError, require_vllm
from fastmath_nemo.policy.megatron.layer_spec import MEGATRON_INSTALL, choose_layer_spec
from fastmath_nemo.policy.presets import preset_error
from fastmath_nemo.rewards.functions import REWARD_FUNCTIONS, RewardSettingsError, check_reward_kwargs
from fastmath_nemo.utils.metric_sinks import sink_error
from fastmath_nemo.utils.topology import trainer_tensor_parallel_size, vllm_tensor_parallel_size, world_size_for

__all__ = ["ConfigError", "check_model_folders", "load_config", "validate"]


def load_config(name: str = "recipe", overrides: list[str] | None = None, conf_dir: Path = CONF_DIR) -> Config:
    """Merge schema defaults <- conf/NAME.yaml (and its defaults) <- overrides; validate."""
    cfg = parse_config(name, overrides, conf_dir)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the first key that cannot run here."""
    check_config(cfg)
    world = world_size_for(cfg)
    _check_rewards(cfg.grpo.rewards)
    if cfg.policy.backend == PolicyBackend.megatron:
        _check_megatron(cfg, world)
    if cfg.generation.backend == GenerationBackend.vllm:
        _check_vllm(cfg, world)
    for i, name in enumerate(cfg.run.loggers):
        if error := sink_error(name):
            raise config_error(f"run.loggers[{i}]", error)
    if cfg.grpo.prompts_per_step % world:
        raise config_error("grpo.prompts_per_step", f"must be divisible by the number of ranks ({world})")
    if cfg.sft.rows_per_step < world:
        raise config_error("sft.rows_per_step", f"must be at least the number of ranks ({world})")
    if cfg.model.preset is not None and (error := preset_error(cfg.model.preset, cfg.model.cache_dir)):
        raise config_error("model.preset", error)
    if cfg.data.chat_template is not None:
        _check_chat_template(cfg.data.chat_template)
    if cfg.stage == Stage.export:
        if world > 1:
            raise config_error("stage", "export runs in one process (python launch/run.py), not under torchrun")
        if error := export_format_error(cfg.export.format):
            raise config_error("export.format", error)


def check_model_folders(cfg: Config) -> None:
    """Every model folder the stage will read exists (never a hub id: nothing is downloaded).
    Not part of :func:`validate`: a config names folders that a later run creates. A plan
    (``run.plan``) reads at most ``config.json`` and reports missing folders itself."""
    if cfg.run.plan:
        return
    folders = {
        "model.path": cfg.model.path,
        "sft.init_from": cfg.sft.init_from if cfg.stage in (Stage.sft, Stage.recipe) else None,
        "grpo.init_from": cfg.grpo.init_from if cfg.stage in (Stage.grpo, Stage.recipe) else None,
        "eval.checkpoint": cfg.eval.checkpoint if cfg.stage == Stage.eval else None,
        "export.checkpoint": cfg.export.checkpoint if cfg.stage == Stage.export else None,
    }
    for key, folder in folders.items():
        if folder is not None and not Path(folder).expanduser().is_dir():
            hint = " (conf=grpo starts from an SFT result: run conf=sft or conf=recipe first)" \
                if key == "grpo.init_from" else ""
            raise config_error(key, f"{folder} is not a local model folder{hint}")


def _check_rewards(specs: list[RewardSpec]) -> None:
    """Each reward is in the registry and takes the settings given (a misspelt setting would
    otherwise be ignored and its default used all run)."""
    for i, spec in enumerate(specs):
        if spec.name not in REWARD_FUNCTIONS:
            raise config_error(f"grpo.rewards[{i}].name", f"{spec.name!r} is not one of {', '.join(REWARD_FUNCTIONS)}")
        try:
            check_reward_kwargs(spec.name, dict(spec.kwargs))
        except RewardSettingsError as e:
            raise config_error(f"grpo.rewards[{i}].kwargs" + (f".{e.key}" if e.key else ""), str(e)) from None


def _check_chat_template(value: str) -> None:
    """A template string that compiles, or the path of a file holding one (read now, so a typo
    fails at start-up instead of after the base model is built)."""
    try:
        check_chat_template(resolve_chat_template(value))
    except (ChatTemplateError, OSError, UnicodeDecodeError) as e:
        raise config_error("data.chat_template", str(e)) from None


def _check_vllm(cfg: Config, world: int) -> None:
    """The engines' layout under torchrun (one engine per block of consecutive ranks,
    generation/vllm_distributed.py), then vLLM's presence (a plan needs no vLLM here)."""
    if error := engine_layout_error(world, vllm_tensor_parallel_size(cfg), trainer_tensor_parallel_size(cfg)):
        raise config_error("generation.vllm.tensor_parallel_size", error)
    if cfg.run.plan:
        return
    import torch

    try:
        require_vllm("cuda" if torch.cuda.is_available() else "cpu")
    except VLLMUnavailableError as e:
        raise config_error("generation.backend", str(e)) from None


def _check_megatron(cfg: Config, world: int) -> None:
    """megatron-core installed (a plan imports nothing), the layer spec this machine can build,
    and a layout that divides the model and the world."""
    m = cfg.policy.megatron
    if importlib.util.find_spec("megatron.core") is None and not cfg.run.plan:
        raise config_error("policy.backend", f"megatron needs megatron-core, which is not installed: {MEGATRON_INSTALL}")
    choose_layer_spec(m)
    shape = _model_shape(cfg)
    if shape is not None:
        heads, kv_heads, layers = shape
        tp, pp = m.tensor_parallel_size, m.pipeline_parallel_size
        if heads % tp or kv_heads % tp:
            raise config_error("policy.megatron.tensor_parallel_size",
                               f"{tp} must divide the attention heads ({heads}) and key/value heads ({kv_heads})")
        if layers % pp:
            raise config_error("policy.megatron.pipeline_parallel_size",
                               f"{pp} must divide the number of layers ({layers})")
    model_parallel = m.tensor_parallel_size * m.pipeline_parallel_size * m.context_parallel_size
    if world % model_parallel:
        raise config_error("policy.megatron.tensor_parallel_size",
                           f"WORLD_SIZE={world} is not divisible by TP x PP x CP = {model_parallel}")


def _model_shape(cfg: Config) -> tuple[int, int, int] | None:
    """(attention heads, key/value heads, layers) of the configured model, when known before loading."""
    if cfg.model.path is None and cfg.model.preset is None:
        t = cfg.model.tiny
        return t.num_attention_heads, t.num_key_value_heads, t.num_layers
    config_file = Path(cfg.model.path or "", "config.json")
    if cfg.model.path is None or not config_file.is_file():
        return None
    hf = json.loads(config_file.read_text())
    heads = int(hf["num_attention_heads"])
    return heads, int(hf.get("num_key_value_heads") or heads), int(hf["num_hidden_layers"])
