"""Checks that types alone cannot express: choices and impossible combinations."""

from __future__ import annotations

import os

from fastmath_nemo.config import schema as s


def _error(key: str, message: str) -> None:
    from fastmath_nemo.config.loader import ConfigError

    raise ConfigError(f"config key '{key}': {message}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _error(key, f"{value!r} is not one of {', '.join(choices)}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        _error(key, f"must be > 0, got {value}")


def validate(cfg: s.Config) -> None:
    from fastmath_nemo.rewards.functions import REWARD_FUNCTIONS

    _choice("stage", cfg.stage, s.STAGES)
    _choice("policy.backend", cfg.policy.backend, s.POLICY_BACKENDS)
    _choice("policy.device", cfg.policy.device, s.DEVICES)
    _choice("policy.dtype", cfg.policy.dtype, s.DTYPES)
    _choice("generation.backend", cfg.generation.backend, s.GENERATION_BACKENDS)
    _choice("data.source", cfg.data.source, s.DATA_SOURCES)
    _choice("grpo.loss_agg", cfg.grpo.loss_agg, s.LOSS_AGGREGATIONS)
    _choice("grpo.length_unit", cfg.grpo.length_unit, s.LENGTH_UNITS)
    _choice("model.tiny.architecture", cfg.model.tiny.architecture, ("qwen2", "llama"))
    for i, model in enumerate(cfg.eval.models):
        _choice(f"eval.models[{i}]", model, s.EVAL_MODELS)
    for i, spec in enumerate(cfg.grpo.rewards):
        _choice(f"grpo.rewards[{i}].name", spec.name, tuple(REWARD_FUNCTIONS))
    if not cfg.grpo.rewards:
        _error("grpo.rewards", "needs at least one reward (without one every advantage is 0)")
    if not cfg.eval.models:
        _error("eval.models", f"needs at least one of {', '.join(s.EVAL_MODELS)}")

    if cfg.policy.backend == "megatron":
        _error("policy.backend", "'megatron' is not available in this release yet; use 'torch'")
    if cfg.generation.backend == "vllm":
        _error("generation.backend", "'vllm' is not available in this release yet; use 'torch'")

    for key, value in [
        ("sft.epochs", cfg.sft.epochs),
        ("sft.rows_per_step", cfg.sft.rows_per_step),
        ("sft.max_seq_len", cfg.sft.max_seq_len),
        ("sft.optimizer.lr", cfg.sft.optimizer.lr),
        ("grpo.steps", cfg.grpo.steps),
        ("grpo.prompts_per_step", cfg.grpo.prompts_per_step),
        ("grpo.updates_per_batch", cfg.grpo.updates_per_batch),
        ("grpo.optimizer.lr", cfg.grpo.optimizer.lr),
        ("generation.max_tokens", cfg.generation.max_tokens),
        ("eval.n_samples", cfg.eval.n_samples),
        ("policy.micro_batch_rows", cfg.policy.micro_batch_rows),
        ("grpo.verify_timeout_s", cfg.grpo.verify_timeout_s),
        ("generation.max_rows", cfg.generation.max_rows),
        ("data.synthetic.n_train", cfg.data.synthetic.n_train),
        ("data.synthetic.n_eval", cfg.data.synthetic.n_eval),
        ("data.synthetic.n_ops", cfg.data.synthetic.n_ops),
        ("model.tiny.num_attention_heads", cfg.model.tiny.num_attention_heads),
        ("model.tiny.num_key_value_heads", cfg.model.tiny.num_key_value_heads),
        ("model.tiny.hidden_size", cfg.model.tiny.hidden_size),
        ("model.tiny.num_layers", cfg.model.tiny.num_layers),
    ]:
        _positive(key, value)
    if cfg.grpo.num_generations < 2:
        _error("grpo.num_generations", "GRPO needs at least 2 completions per prompt to form a group")
    if cfg.grpo.eps_low < 0 or cfg.grpo.eps_high < 0:
        _error("grpo.eps_low", "clip epsilons must be >= 0")
    if cfg.grpo.beta < 0:
        _error("grpo.beta", "must be >= 0 (0 loads no reference model)")
    if cfg.grpo.tis_cap is not None and cfg.grpo.tis_cap < 1.0:
        _error("grpo.tis_cap", f"must be >= 1 (a cap on an importance weight), got {cfg.grpo.tis_cap}")
    for section, sampling in (("generation", cfg.generation), ("eval", cfg.eval)):
        if not 0.0 < sampling.top_p <= 1.0:
            _error(f"{section}.top_p", f"must be in (0, 1], got {sampling.top_p}")
        if not 0.0 <= sampling.min_p < 1.0:
            _error(f"{section}.min_p", f"must be in [0, 1), got {sampling.min_p}")
    if cfg.generation.temperature <= 0:
        _error("generation.temperature", "GRPO samples need temperature > 0")
    if not cfg.eval.token_budgets or any(b <= 0 for b in cfg.eval.token_budgets):
        _error("eval.token_budgets", "needs at least one positive budget")
    for k in cfg.eval.k_values:
        if k < 1:
            _error("eval.k_values", f"k={k} must be >= 1")
        if k > cfg.eval.n_samples:
            _error("eval.k_values", f"k={k} exceeds eval.n_samples={cfg.eval.n_samples}")
    for key, opt in (("sft.optimizer", cfg.sft.optimizer), ("grpo.optimizer", cfg.grpo.optimizer)):
        if len(opt.betas) != 2:
            _error(f"{key}.betas", "needs two values")
        if not 0.0 <= opt.warmup_ratio < 1.0:
            _error(f"{key}.warmup_ratio", "must be in [0, 1)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.grpo.prompts_per_step % world:
        _error("grpo.prompts_per_step", f"must be divisible by the number of ranks ({world})")
    if cfg.sft.rows_per_step < world:
        _error("sft.rows_per_step", f"must be at least the number of ranks ({world})")
    if cfg.model.path is None:
        tiny = cfg.model.tiny
        if tiny.hidden_size % tiny.num_attention_heads:
            _error("model.tiny.num_attention_heads", "must divide model.tiny.hidden_size")
        if tiny.num_attention_heads % tiny.num_key_value_heads:
            _error("model.tiny.num_key_value_heads", "must divide model.tiny.num_attention_heads")
    if cfg.data.source == "files":
        needed = {"recipe": ("sft_path", "grpo_path", "eval_path"), "sft": ("sft_path",),
                  "grpo": ("grpo_path",), "eval": ("eval_path",)}[cfg.stage]
        for name in needed:
            if getattr(cfg.data, name) is None:
                _error(f"data.{name}", f"required by stage={cfg.stage} with data.source=files")
    if cfg.stage == "grpo" and cfg.grpo.init_from is None:
        _error("grpo.init_from", "stage=grpo starts from a checkpoint (the SFT result); set its path")
    if cfg.stage == "eval" and cfg.eval.checkpoint is None and cfg.model.path is None:
        _error("eval.checkpoint", "stage=eval needs a model: set eval.checkpoint or model.path")
