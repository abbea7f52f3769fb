"""What the configuration alone decides: ranges and combinations that its types cannot express.

Choices are enumerations, checked when the loader parses (``schema.py``). What depends on
this machine (installed packages, model folders), on the world size or on an
implementation's own knowledge (reward settings, chat templates, layer specs) is checked by
``fastmath_nemo.preflight``, which calls :func:`check_config` first.
"""

from __future__ import annotations

from fastmath_nemo.config import schema as s
from fastmath_nemo.config.errors import config_error


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise config_error(key, f"must be > 0, got {value}")


def check_config(cfg: s.Config) -> None:
    """Raise ``ConfigError`` naming the first key whose value cannot run."""
    p = cfg.policy
    if p.logprob_chunk_tokens < 0:
        raise config_error("policy.logprob_chunk_tokens", f"must be >= 0 (0: whole rows), got {p.logprob_chunk_tokens}")
    if p.max_tokens_per_micro_batch is not None:
        _positive("policy.max_tokens_per_micro_batch", p.max_tokens_per_micro_batch)
    if not cfg.grpo.rewards:
        raise config_error("grpo.rewards", "needs at least one reward (without one every advantage is 0)")
    if not cfg.eval.models:
        raise config_error("eval.models", f"needs at least one of {', '.join(s.EvalModel)}")
    if p.backend == s.PolicyBackend.megatron:
        _check_megatron(p.megatron)
    elif cfg.checkpoint.async_save:
        raise config_error("checkpoint.async_save", "the torch backend writes its checkpoints synchronously (one "
                           "process holds the whole model, so there are no shards to write in parallel); "
                           "asynchronous saving is policy.backend=megatron's")
    if cfg.generation.backend == s.GenerationBackend.vllm:
        _check_vllm(cfg.generation.vllm)
    _check_heldout(cfg.grpo)
    if s.MetricLogger.jsonl not in cfg.run.loggers:
        raise config_error("run.loggers", "must include jsonl: metrics.jsonl feeds the report and resumed runs")
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
        ("policy.micro_batch_rows", p.micro_batch_rows),
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
    _check_grpo(cfg.grpo)
    _check_sampling(cfg)
    for key, opt in (("sft.optimizer", cfg.sft.optimizer), ("grpo.optimizer", cfg.grpo.optimizer)):
        if len(opt.betas) != 2:
            raise config_error(f"{key}.betas", "needs two values")
        if not 0.0 <= opt.warmup_ratio < 1.0:
            raise config_error(f"{key}.warmup_ratio", "must be in [0, 1)")
    if cfg.run.plan_world_size is not None:
        _positive("run.plan_world_size", cfg.run.plan_world_size)
    if cfg.run.plan_gpu_memory_gib is not None:
        _positive("run.plan_gpu_memory_gib", cfg.run.plan_gpu_memory_gib)
    _positive("run.plan_prompt_tokens", cfg.run.plan_prompt_tokens)
    _positive("run.plan_gpus_per_node", cfg.run.plan_gpus_per_node)
    _positive("run.plan_write_gib_per_s", cfg.run.plan_write_gib_per_s)
    if cfg.run.plan_step_s < 0:
        raise config_error("run.plan_step_s", f"must be >= 0, got {cfg.run.plan_step_s}")
    _positive("run.distributed_timeout_s", cfg.run.distributed_timeout_s)
    _check_model(cfg.model)
    _check_stage(cfg)


def _check_synthetic_weights(weights: list[float] | None, max_checks: int) -> None:
    key = "data.synthetic.check_weights"
    if weights is None:
        return
    if len(weights) != max_checks + 1:
        raise config_error(key, f"needs one weight per check count 0..{max_checks} (data.synthetic.max_checks), "
                                f"got {len(weights)}: {list(weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise config_error(key, f"weights must be >= 0 with a positive sum, got {list(weights)}")


def _check_grpo(g: s.GRPOConfig) -> None:
    if g.num_generations < 2:
        raise config_error("grpo.num_generations", "GRPO needs at least 2 completions per prompt to form a group")
    if g.eps_low < 0 or g.eps_high < 0:
        raise config_error("grpo.eps_low", "clip epsilons must be >= 0")
    if g.beta < 0:
        raise config_error("grpo.beta", "must be >= 0 (0 loads no reference model)")
    if g.mismatch_every_steps < 0:
        raise config_error("grpo.mismatch_every_steps",
                           f"must be >= 0 (0: never log the mismatch), got {g.mismatch_every_steps}")
    if g.tis_cap is not None and g.tis_cap < 1.0:
        raise config_error("grpo.tis_cap", f"must be >= 1 (a cap on an importance weight), got {g.tis_cap}")
    if g.dynamic_sampling_max_rounds < 0:
        raise config_error("grpo.dynamic_sampling_max_rounds",
                           f"must be >= 0 (extra generation rounds), got {g.dynamic_sampling_max_rounds}")
    if g.gfpo.keep is not None and not 2 <= g.gfpo.keep < g.num_generations:
        raise config_error("grpo.gfpo.keep", f"must be in [2, grpo.num_generations) (completions kept of the "
                           f"{g.num_generations} sampled), got {g.gfpo.keep}")
    _check_prompt_budget(g.prompt_budget)
    budgeted = [r.name for r in g.rewards if r.name in ("lcpo_exact", "lcpo_max")]
    if budgeted and not g.prompt_budget.budgets:
        raise config_error("grpo.prompt_budget.budgets", f"the {budgeted[0]} reward holds completions to the "
                           "budget in their prompts: give the budgets to draw from")


def _check_prompt_budget(b: s.PromptBudgetConfig) -> None:
    if any(n <= 0 for n in b.budgets):
        raise config_error("grpo.prompt_budget.budgets", f"must be > 0 (tokens), got {list(b.budgets)}")
    for field_name in ("{problem}", "{budget}"):
        if field_name not in b.template:
            raise config_error("grpo.prompt_budget.template", f"must contain {field_name}, got {b.template!r}")
    try:
        b.template.format(problem="", budget=0)
    except (KeyError, IndexError, ValueError) as e:
        raise config_error("grpo.prompt_budget.template",
                           f"has a field other than {{problem}} and {{budget}} ({e!r}): {b.template!r}") from None


def _check_sampling(cfg: s.Config) -> None:
    for section, sampling in (("generation", cfg.generation), ("eval", cfg.eval)):
        if not 0.0 < sampling.top_p <= 1.0:
            raise config_error(f"{section}.top_p", f"must be in (0, 1], got {sampling.top_p}")
        if not 0.0 <= sampling.min_p < 1.0:
            raise config_error(f"{section}.min_p", f"must be in [0, 1), got {sampling.min_p}")
    if cfg.generation.temperature <= 0:
        raise config_error("generation.temperature", "GRPO samples need temperature > 0")
    if not cfg.eval.token_budgets or any(b <= 0 for b in cfg.eval.token_budgets):
        raise config_error("eval.token_budgets", "needs at least one positive budget")
    for k in cfg.eval.k_values:
        if k < 1:
            raise config_error("eval.k_values", f"k={k} must be >= 1")
        if k > cfg.eval.n_samples:
            raise config_error("eval.k_values", f"k={k} exceeds eval.n_samples={cfg.eval.n_samples}")
    if cfg.eval.bootstrap_resamples < 1:
        raise config_error("eval.bootstrap_resamples", f"must be >= 1, got {cfg.eval.bootstrap_resamples}")
    if any(n <= 0 for n in cfg.eval.prompted_budgets):
        raise config_error("eval.prompted_budgets", f"must be > 0 (tokens), got {list(cfg.eval.prompted_budgets)}")


def _check_model(model: s.ModelConfig) -> None:
    if model.preset is not None and model.path is not None:
        raise config_error("model.preset", "set either model.path or model.preset, not both")
    if model.path is None and model.preset is None:
        tiny = model.tiny
        if tiny.hidden_size % tiny.num_attention_heads:
            raise config_error("model.tiny.num_attention_heads", "must divide model.tiny.hidden_size")
        if tiny.num_attention_heads % tiny.num_key_value_heads:
            raise config_error("model.tiny.num_key_value_heads", "must divide model.tiny.num_attention_heads")


def _check_stage(cfg: s.Config) -> None:
    """What each stage needs to be given."""
    if cfg.data.source == s.DataSource.files:
        needed = {s.Stage.recipe: ("sft_path", "grpo_path", "eval_path"), s.Stage.sft: ("sft_path",),
                  s.Stage.grpo: ("grpo_path",), s.Stage.eval: ("eval_path",), s.Stage.export: ()}[cfg.stage]
        for name in needed:
            if getattr(cfg.data, name) is None:
                raise config_error(f"data.{name}", f"required by stage={cfg.stage} with data.source=files")
    if cfg.stage == s.Stage.grpo and cfg.grpo.init_from is None:
        raise config_error("grpo.init_from", "stage=grpo starts from a checkpoint (the SFT result); set its path")
    if cfg.stage == s.Stage.eval and cfg.eval.checkpoint is None and cfg.model.path is None and cfg.model.preset is None:
        raise config_error("eval.checkpoint", "stage=eval needs a model: set eval.checkpoint, model.path or model.preset")
    if cfg.stage == s.Stage.export:
        if cfg.export.checkpoint is None:
            raise config_error("export.checkpoint",
                               "stage=export needs the checkpoint to export (e.g. runs/recipe/grpo/final)")
        if cfg.export.dir is None:
            raise config_error("export.dir", "stage=export needs the folder to write")


def _check_vllm(v: s.VLLMConfig) -> None:
    if v.tensor_parallel_size is not None:
        _positive("generation.vllm.tensor_parallel_size", v.tensor_parallel_size)
    _positive("generation.vllm.refit_bucket_mb", v.refit_bucket_mb)
    _positive("generation.vllm.cpu_kvcache_gb", v.cpu_kvcache_gb)
    if not 0.0 < v.gpu_memory_utilization <= 1.0:
        raise config_error("generation.vllm.gpu_memory_utilization", f"must be in (0, 1], got {v.gpu_memory_utilization}")
    if v.sleep_level not in (0, 1):
        # level 2 also drops buffers that a refit does not restore (e.g. rotary caches)
        raise config_error("generation.vllm.sleep_level",
                           f"must be 0 (stay resident) or 1 (offload while training), got {v.sleep_level}")


def _check_megatron(m: s.MegatronConfig) -> None:
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size"):
        _positive(f"policy.megatron.{key}", getattr(m, key))
    if m.sequence_parallel and m.tensor_parallel_size == 1:
        raise config_error("policy.megatron.sequence_parallel", "only applies with tensor_parallel_size > 1")


def _check_heldout(g: s.GRPOConfig) -> None:
    """Held-out evaluation during GRPO and the kept checkpoint (algorithms.checkpoint_choice)."""
    if g.eval_every_steps < 0:
        raise config_error("grpo.eval_every_steps",
                           f"must be >= 0 (0: no held-out evaluation), got {g.eval_every_steps}")
    if g.keep == s.KeepRule.best and g.eval_every_steps == 0:
        raise config_error("grpo.keep", "'best' chooses by held-out evaluations: set grpo.eval_every_steps > 0")
    if not 0.0 <= g.keep_tolerance <= 1.0:
        raise config_error("grpo.keep_tolerance", f"must be in [0, 1] (a share of pass@1), got {g.keep_tolerance}")
    if not 0.0 <= g.keep_tokens_tolerance <= 1.0:
        raise config_error("grpo.keep_tokens_tolerance",
                           f"must be in [0, 1] (a share of mean tokens), got {g.keep_tokens_tolerance}")
    if g.keep_eligibility == s.KeepEligibility.interval and g.keep != s.KeepRule.best:
        raise config_error("grpo.keep_eligibility", "chooses among held-out evaluations: set grpo.keep=best")
    if g.eval_every_steps > 0:
        _positive("grpo.heldout_problems", g.heldout_problems)
        _positive("grpo.heldout_n_samples", g.heldout_n_samples)
        if g.heldout_token_budget is not None:
            _positive("grpo.heldout_token_budget", g.heldout_token_budget)
