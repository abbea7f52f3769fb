"""Wiring of the stages: data, model folders, policy, generator; recipe = SFT -> GRPO -> eval.

Run directory layout (``run.dir``, default ``runs/<run.name>``)::

    config.yaml        the resolved configuration
    metrics.jsonl      one JSON object per logged step ({"stage", "step", ...})
    base/              embedded default only: the tiny model and its tokenizer
    sft/checkpoints/step_N, sft/final      (Hugging Face folders)
    grpo/checkpoints/step_N, grpo/final
    eval/<model>@<budget>.json, report.json, report.md
    eval/<model>@<budget>.samples.jsonl    every graded completion (sft-epoch<E>@<budget> for
                                           evaluations during SFT)
    eval/<model>-think<N>@<budget>.json    eval.prompted_budgets: the budget N written into the prompts
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fastmath_nemo.algorithms.checkpoint_choice import KEPT_FILE
from fastmath_nemo.algorithms.grpo import run_grpo
from fastmath_nemo.algorithms.sft import run_sft, tokenize_sft
from fastmath_nemo.batching.micro_batches import MicroBatching
from fastmath_nemo.checkpoint.atomic import atomic_directory, atomic_write_json, atomic_write_text, is_complete, mark_complete
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.checkpoint.portable_folders import make_folder_portable
from fastmath_nemo.checkpoint.preemption import preemption_requested, raise_preempted
from fastmath_nemo.config.loader import to_yaml
from fastmath_nemo.config.schema import Config, DataSource, GenerationBackend, PolicyBackend, Stage
from fastmath_nemo.data.chat import resolve_chat_template
from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.data.synthetic import generate_splits
from fastmath_nemo.data.tokenizer import build_task_tokenizer
from fastmath_nemo.evaluation.report import EvalRow, format_table, write_report
from fastmath_nemo.evaluation.runner import evaluate
from fastmath_nemo.generation.base import Generator, RolloutsAbandoned
from fastmath_nemo.generation.torch_generator import TorchGenerator
from fastmath_nemo.policy.base import Policy
from fastmath_nemo.policy.models import DTYPES, build_tiny_model, load_pretrained
from fastmath_nemo.policy.presets import preset_model_dir
from fastmath_nemo.policy.torch_policy import TorchPolicy
from fastmath_nemo.utils.distributed import (
    barrier,
    init_distributed_if_needed,
    is_rank0,
    release_device_memory,
    resolve_device,
    seed_everything,
    set_distributed_timeout,
)
from fastmath_nemo.utils.metric_sinks import MetricSink, build_sinks
from fastmath_nemo.utils.metrics_logger import METRICS_FILENAME, MetricsLogger, read_metrics
from fastmath_nemo.utils.topology import vllm_tensor_parallel_size

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    sft: list[MathRecord]
    grpo: list[MathRecord]
    eval: list[MathRecord]
    grpo_heldout: list[MathRecord] = dataclasses.field(default_factory=list)  # GRPO's checkpoint choice


@dataclass
class Run:
    cfg: Config
    dir: Path
    device: torch.device
    metrics: MetricsLogger


def load_task_data(cfg: Config) -> TaskData:
    d = cfg.data
    heldout = cfg.grpo.heldout_problems if cfg.grpo.eval_every_steps > 0 and cfg.stage in (Stage.recipe, Stage.grpo) else 0
    if d.source == DataSource.synthetic:
        # The held-out slice is generated after the evaluation set, so that set and the
        # training set are the same problems as without it, and no problem is in two sets.
        train, held_out = generate_splits(dataclasses.replace(d.synthetic, n_eval=d.synthetic.n_eval + heldout))
        data = TaskData(sft=train, grpo=train, eval=held_out[: d.synthetic.n_eval],
                        grpo_heldout=held_out[d.synthetic.n_eval :])
    else:
        from fastmath_nemo.data.loading import load_records  # datasets is only needed for files

        def load(path: str | None, trace: bool) -> list[MathRecord]:
            if path is None:
                return []
            return load_records(path, problem_field=d.problem_field, answer_field=d.answer_field,
                                trace_field=d.trace_field if trace else None, split=d.split,
                                skip_bad_rows=d.skip_bad_rows)
        data = TaskData(sft=load(d.sft_path, True), grpo=load(d.grpo_path, False), eval=load(d.eval_path, False))
        if heldout:
            data.grpo, data.grpo_heldout = split_heldout(data.grpo, heldout, cfg.run.seed, d.grpo_path)
    if d.max_eval_problems is not None:
        data.eval = data.eval[: d.max_eval_problems]
    return data


def split_heldout(records: list[MathRecord], n: int, seed: int, path: str | None) -> tuple[list[MathRecord], list[MathRecord]]:
    """(GRPO's training problems, ``n`` held-out ones drawn at random with ``seed``): the
    held-out slice of GRPO's checkpoint choice is never trained on in GRPO."""
    if n >= len(records):
        raise ValueError(f"config key 'grpo.heldout_problems': {n} held-out problems leave none of the "
                         f"{len(records)} in {path} for GRPO to train on")
    chosen = set(random.Random(f"heldout:{seed}").sample(range(len(records)), n))
    return ([r for i, r in enumerate(records) if i not in chosen],
            [r for i, r in enumerate(records) if i in chosen])


def base_model_dir(run: Run, data: TaskData) -> Path:
    """``model.path`` or ``model.preset`` if given, else the embedded tiny model (built once
    per run dir)."""
    cfg = run.cfg
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    if cfg.model.preset is not None:
        if is_rank0():
            preset_model_dir(cfg.model.preset, cfg.model.cache_dir)
        barrier()
        return preset_model_dir(cfg.model.preset, cfg.model.cache_dir)
    target = run.dir / "base"
    if is_complete(target):
        return target
    if not data.sft:
        raise ValueError("model.path is null and there is no SFT data to train the embedded tokenizer on: "
                         "set model.path to a Hugging Face model folder")
    if is_rank0():
        corpus = [f"{cfg.data.system_prompt or ''}\n{r.problem}\n{r.trace or ''}" for r in data.sft]
        with atomic_directory(target) as tmp:
            tokenizer = build_task_tokenizer(corpus, tmp, vocab_size=cfg.model.tokenizer_vocab_size)
            model = build_tiny_model(cfg.model.tiny, tokenizer, seed=cfg.run.seed)
            model.save_pretrained(str(tmp), safe_serialization=True)
            make_folder_portable(tmp)  # its config.json, written after the tokenizer
            mark_complete(tmp)
        logger.info("built the embedded tiny model (%.2fM parameters) in %s",
                    sum(p.numel() for p in model.parameters()) / 1e6, target)
    barrier()
    return target


def load_tokenizer(model_dir: Path, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder; ``chat_template`` (``data.chat_template``: Jinja text or
    a file path) replaces its template. Every stage loads through here, so SFT, GRPO and
    evaluation all render with the configured template, and checkpoints (which save this
    tokenizer) carry it to later stages and runs."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    if not tokenizer.chat_template:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template (set data.chat_template)")
    return tokenizer


def load_policy(run: Run, model_dir: Path, temperature: float = 1.0, backend: PolicyBackend | None = None) -> Policy:
    """``policy.backend``: a transformers model (torch) or a megatron-core GPTModel built from
    the same Hugging Face folder (megatron). The policy holds the run's micro-batch split
    (``policy.micro_batch_rows`` / ``max_tokens_per_micro_batch``), which the loops use too."""
    cfg = run.cfg.policy
    split = MicroBatching.of(cfg)
    if (backend or cfg.backend) == PolicyBackend.megatron:
        from fastmath_nemo.policy.megatron.policy import MegatronPolicy  # megatron-core is optional

        return MegatronPolicy(model_dir, cfg.megatron, temperature=temperature, params_dtype=DTYPES[cfg.dtype],
                              seed=run.cfg.run.seed, logprob_chunk_tokens=cfg.logprob_chunk_tokens,
                              packed_attention=cfg.packed_attention, micro_batching=split)
    model = load_pretrained(model_dir, "float32")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return TorchPolicy(model, run.device, temperature, DTYPES[cfg.dtype],
                       logprob_chunk_tokens=cfg.logprob_chunk_tokens, packed_attention=cfg.packed_attention,
                       micro_batching=split)


def make_generator(run: Run, model_dir: Path, tokenizer: PreTrainedTokenizerBase,
                   policy: Policy | None = None) -> Generator:
    """``generation.backend``: ``torch`` samples with a TorchPolicy's own module, or with a
    transformers copy loaded from ``model_dir`` (no policy, or a Megatron one); ``vllm`` builds
    a colocated engine from ``model_dir``. The caller refits both from the policy as it trains."""
    gen = run.cfg.generation
    if gen.backend == GenerationBackend.vllm:
        from fastmath_nemo.generation.vllm_generator import VLLMGenerator  # vllm is optional

        # Under torchrun one engine per block of ranks, built by all ranks at once; no
        # transformers copy of the model on any rank (each engine loads its own shards).
        return VLLMGenerator(model_dir, gen.vllm, seed=run.cfg.run.seed,
                             tensor_parallel_size=vllm_tensor_parallel_size(run.cfg))
    sampler = policy if isinstance(policy, TorchPolicy) else load_policy(run, model_dir, backend=PolicyBackend.torch)
    return TorchGenerator(sampler.model, int(tokenizer.pad_token_id), max_rows=gen.max_rows,
                          compute_dtype=sampler.compute_dtype)


# -- stages ------------------------------------------------------------------------------
def sft_stage(run: Run, data: TaskData, init_dir: Path) -> Path:
    cfg = run.cfg
    checkpoints = CheckpointManager(run.dir / "sft", load_tokenizer(init_dir, cfg.data.chat_template),
                                    cfg.sft.keep_last_checkpoints, async_save=cfg.checkpoint.async_save)
    if cfg.resume and checkpoints.is_finished():
        logger.info("SFT already finished: %s", checkpoints.final_dir)
        return checkpoints.final_dir
    tokenizer = checkpoints.tokenizer
    policy = load_policy(run, init_dir)
    sft_data = tokenize_sft(data.sft, tokenizer, cfg.data.system_prompt, cfg.sft.max_seq_len)

    generators: list[Generator] = []  # built at the first epoch's evaluation, refit after

    def evaluate_epoch(epoch: int) -> dict[str, float]:
        if not generators:
            generators.append(make_generator(run, init_dir, tokenizer, policy))
        generators[0].update_weights(policy.export_weights())
        budget = cfg.eval.token_budgets[0]
        summary = evaluate(generators[0], tokenizer, data.eval, cfg.eval, cfg.generation, budget,
                           cfg.data.system_prompt, cfg.grpo.verify_timeout_s, label=f"sft-epoch{epoch}@{budget}",
                           samples_path=run.dir / "eval" / f"sft-epoch{epoch}@{budget}.samples.jsonl")
        return {"pass@1": summary["pass@1"], "mean_output_tokens": summary["mean_output_tokens"]}

    run_sft(policy, sft_data, cfg.sft, checkpoints, run.metrics, seed=cfg.run.seed, resume=cfg.resume,
            on_epoch_end=evaluate_epoch)
    for generator in generators:
        generator.close()
    return checkpoints.final_dir


def grpo_stage(run: Run, data: TaskData, init_dir: Path) -> Path:
    cfg = run.cfg
    checkpoints = CheckpointManager(run.dir / "grpo", load_tokenizer(init_dir, cfg.data.chat_template),
                                    cfg.grpo.keep_last_checkpoints, async_save=cfg.checkpoint.async_save)
    if cfg.resume and checkpoints.is_finished():
        logger.info("GRPO already finished: %s", checkpoints.final_dir)
        return checkpoints.final_dir
    policy = load_policy(run, init_dir, temperature=cfg.generation.temperature)
    if cfg.grpo.beta > 0:
        # The KL reference is this stage's initial weights, kept on the host (before any resume
        # loads a later checkpoint into the policy).
        policy.snapshot_reference()
    generator = make_generator(run, init_dir, checkpoints.tokenizer, policy)
    g = cfg.grpo
    budget = g.heldout_token_budget or cfg.generation.max_tokens
    # The evaluation protocol's sampling (eval.temperature, top_p, min_p, seed) with the slice's own size.
    heldout_cfg = dataclasses.replace(cfg.eval, n_samples=g.heldout_n_samples, k_values=[])

    def evaluate_heldout(step: int) -> dict[str, Any]:
        return evaluate(generator, checkpoints.tokenizer, data.grpo_heldout, heldout_cfg, cfg.generation, budget,
                        cfg.data.system_prompt, g.verify_timeout_s, label=f"grpo-step{step}@{budget}",
                        samples_path=run.dir / "eval" / f"grpo-step{step}@{budget}.samples.jsonl")

    final = run_grpo(policy, generator, checkpoints.tokenizer, data.grpo, g, cfg.generation,
                     cfg.data.system_prompt, checkpoints, run.metrics, seed=cfg.run.seed, resume=cfg.resume,
                     evaluate_heldout=evaluate_heldout if data.grpo_heldout else None)
    generator.close()
    return final


def eval_stage(run: Run, data: TaskData, models: dict[str, Path]) -> list[EvalRow]:
    cfg = run.cfg
    rows: list[EvalRow] = []
    for name, model_dir in models.items():
        tokenizer = load_tokenizer(model_dir, cfg.data.chat_template)
        generator: Generator | None = None
        for label, budget, records in evaluations_of(name, data.eval, cfg):
            cached = run.dir / "eval" / f"{label.replace('|think ', '-think')}@{budget}.json"
            settings = {**dataclasses.asdict(cfg.eval), "n_problems": len(records), "model_dir": str(model_dir)}
            if cfg.resume and cached.exists():
                saved = json.loads(cached.read_text())
                if saved.get("settings") == settings:
                    rows.append(EvalRow.from_dict(saved["row"]))
                    continue
                logger.info("eval settings changed since %s was written: evaluating again", cached)
            # Between evaluations (all ranks agree on which are cached): a stop here loses
            # nothing, since resume=true reuses every evaluation written so far.
            if preemption_requested():
                raise_preempted("eval", len(rows), cached.parent)
            if generator is None:
                generator = make_generator(run, model_dir, tokenizer)
            logger.info("evaluating %s at a %d-token budget on %d problems x %d samples",
                        label, budget, len(records), cfg.eval.n_samples)
            try:
                summary = evaluate(generator, tokenizer, records, cfg.eval, cfg.generation, budget,
                                   cfg.data.system_prompt, cfg.grpo.verify_timeout_s, label=f"{label}@{budget}",
                                   samples_path=cached.with_suffix(".samples.jsonl"))
            except RolloutsAbandoned:  # a stop request: the evaluations cached so far are kept
                raise_preempted("eval", len(rows), cached.parent)
            row = EvalRow(label, budget, summary)
            numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
            run.metrics.log(f"eval/{label}@{budget}", 0, numbers)
            if is_rank0():
                cached.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(cached, {"settings": settings, "row": row.to_dict()})
            rows.append(row)
        if generator is not None:
            generator.close()
            generator = None
            release_device_memory()  # before the next model's engine sizes its cache
    if is_rank0():
        # The GRPO stage's choice (algorithms.checkpoint_choice) sits beside its output folder.
        kept_file = models["grpo"].parent / KEPT_FILE if "grpo" in models else None
        kept = json.loads(kept_file.read_text()) if kept_file is not None and kept_file.is_file() else None
        metrics_file = run.dir / METRICS_FILENAME
        write_report(rows, run.dir, {"run": cfg.run.name, "stage": cfg.stage, "models": {k: str(v) for k, v in models.items()}},
                     metrics=read_metrics(metrics_file) if metrics_file.is_file() else [], kept=kept)
    return rows


def evaluations_of(name: str, records: list[MathRecord], cfg: Config) -> list[tuple[str, int, list[MathRecord]]]:
    """(row label, token budget, problems) of one model's evaluations: every eval.token_budgets,
    then (L1) every eval.prompted_budgets written into the problems with
    grpo.prompt_budget.template, at the largest token budget, labelled ``<model>|think N``."""
    out = [(name, budget, records) for budget in cfg.eval.token_budgets]
    template = cfg.grpo.prompt_budget.template
    for prompted in cfg.eval.prompted_budgets:
        budgeted = [dataclasses.replace(r, problem=template.format(problem=r.problem, budget=prompted))
                    for r in records]
        out.append((f"{name}|think {prompted}", max(cfg.eval.token_budgets), budgeted))
    return out


# -- entry point -------------------------------------------------------------------------
def start_run(cfg: Config) -> Run:
    device = resolve_device(cfg.policy.device)
    set_distributed_timeout(cfg.run.distributed_timeout_s)  # before any process group exists
    init_distributed_if_needed(device)
    seed_everything(cfg.run.seed)
    run_dir = Path(cfg.run.dir or Path("runs") / cfg.run.name)
    if is_rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    logger.info("run directory: %s (device %s)", run_dir, device)
    sinks: list[MetricSink] = []  # run.loggers beyond metrics.jsonl, rank 0 only; their config as config.yaml has it (no secrets)
    if is_rank0():
        written = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)), resolve=False)
        sinks = build_sinks(cfg.run.loggers, run_dir, cfg.run.name, written)  # type: ignore[arg-type]
    return Run(cfg, run_dir, device, MetricsLogger(run_dir / "metrics.jsonl", sinks=sinks))


def run_stage(cfg: Config) -> dict[str, Any]:
    """Run ``cfg.stage``; returns what it produced (model folders, evaluation rows). With
    ``run.plan``: the per-GPU memory plan only (no process group, weights or run directory)."""
    if cfg.stage == Stage.export:  # one checkpoint in another format: no run directory, data or process group
        from fastmath_nemo.export import export_checkpoint

        return {"export": export_checkpoint(cfg.export)}
    if cfg.run.plan:
        from fastmath_nemo.planning.plan import run_plan

        return run_plan(cfg)
    run = start_run(cfg)
    data = load_task_data(cfg)
    out: dict[str, Any] = {}
    # Each stage's policy, optimizer and generator are its locals: gone when it returns, and
    # their device memory is released before the next stage allocates its own.
    if cfg.stage in (Stage.recipe, Stage.sft):
        out["sft"] = sft_stage(run, data, Path(cfg.sft.init_from) if cfg.sft.init_from else base_model_dir(run, data))
        release_device_memory()
    if cfg.stage in (Stage.recipe, Stage.grpo):
        out["grpo"] = grpo_stage(run, data, Path(cfg.grpo.init_from) if cfg.grpo.init_from else out["sft"])
        release_device_memory()
    if cfg.stage in (Stage.recipe, Stage.eval):
        if cfg.stage == Stage.eval:
            models = {"model": Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else base_model_dir(run, data)}
        else:
            candidates = {"base": base_model_dir(run, data), **out}
            models = {k: v for k, v in candidates.items() if k in cfg.eval.models}
        rows = eval_stage(run, data, models)
        out["evaluations"] = rows
        if is_rank0():
            print(format_table(rows), flush=True)  # the product's headline output
    run.metrics.close()
    return out
