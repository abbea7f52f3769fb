"""Stage 2 of the recipe: GRPO with length-aware rewards, from the SFT model.

    for step in 1..S:
        prompts  -> Generator.generate (n per prompt)          timing/generation_s
        rewards  = sum_k w_k r_k (format, cosine, Kimi length, ...)  timing/scoring_s
                   [correct never below wrong; GFPO's filter; dynamic sampling's rounds:
                    algorithms.rollout_rounds]
        A        = group-normalised rewards                     (Dr.GRPO: no std division)
        old      = Policy.logprobs(...)                         timing/logprobs_s; only when needed
                   |old - rollout logprobs| rollout/logprob_diff_*  every mismatch_every_steps
        ref      = Reference.logprobs(...)                      (only when beta > 0)
        Policy.train_step(batch, grpo_loss) x updates_per_batch timing/train_s
        Generator.update_weights(Policy.export_weights())       timing/refit_s
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fastmath_nemo.algorithms.advantages import group_advantages
from fastmath_nemo.algorithms.checkpoint_choice import CheckpointChoice
from fastmath_nemo.algorithms.losses import GRPOLossConfig, grpo_loss, masked_sum
from fastmath_nemo.algorithms.rollout_rounds import StepPrompts, collect_step
from fastmath_nemo.algorithms.scoring import ScoredRows, score_rollouts  # noqa: F401  (re-exported)
from fastmath_nemo.batching.batch import Batch
from fastmath_nemo.batching.micro_batches import micro_batches
from fastmath_nemo.batching.step_totals import step_totals
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.checkpoint.preemption import preemption_requested, raise_preempted, stop_for_preemption
from fastmath_nemo.config.schema import GenerationConfig, GRPOConfig
from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.generation.base import Generator, Rollouts, RolloutsAbandoned
from fastmath_nemo.generation.params import sampling_params
from fastmath_nemo.policy.base import Policy
from fastmath_nemo.policy.optimization import at_step
from fastmath_nemo.utils.distributed import (
    all_gather_objects,
    all_reduce_data_parallel,
    is_rank0,
    shard,
)
from fastmath_nemo.utils.metrics_logger import MetricsLogger

logger = logging.getLogger(__name__)


def run_grpo(
    policy: Policy,
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    records: list[MathRecord],
    cfg: GRPOConfig,
    gen_cfg: GenerationConfig,
    system_prompt: str | None,
    checkpoints: CheckpointManager,
    metrics: MetricsLogger,
    *,
    seed: int,
    resume: bool = False,
    evaluate_heldout: Callable[[int], dict[str, Any]] | None = None,
) -> Path:
    """GRPO for ``cfg.steps`` steps; returns the stage's output folder (the kept step's weights,
    ``algorithms.checkpoint_choice``: ``evaluate_heldout(step)`` evaluates the current weights
    on the held-out slice at step 0, every ``cfg.eval_every_steps`` and the last step). Each
    step's rows on this rank are trained in the micro-batches ``policy.micro_batching`` makes
    (by rows, or by a token budget over rows sorted by length); ``cfg.loss_agg`` is normalised
    over the whole step (all micro-batches, all data-parallel ranks), so the split never
    changes it."""
    prompts = StepPrompts(records, tokenizer, system_prompt, cfg, seed)
    if not cfg.correctness_first:
        logger.warning("grpo.correctness_first=false: a correct completion can get less total reward than a wrong "
                       "one of its group with these rewards (%s)", ", ".join(r.name for r in cfg.rewards))
    loss_cfg = GRPOLossConfig(
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
        loss_agg=cfg.loss_agg,
        norm_length=gen_cfg.max_tokens, tis_cap=cfg.tis_cap,
    )
    policy.setup_optimizer(cfg.optimizer, cfg.steps * cfg.updates_per_batch)
    choice = CheckpointChoice(cfg, evaluate_heldout, checkpoints, metrics)
    start = 0
    if resume and (latest := checkpoints.latest()) is not None:
        state = policy.load(latest)
        start = int(state["step"])
        choice.restore(state, latest)
        generator.update_weights(policy.export_weights())
        logger.info("resuming GRPO from %s (step %d of %d)", latest, start, cfg.steps)
        metrics.resume("grpo", start)  # supersedes steps a killed run logged after its checkpoint

    # Prompt order: a fresh seeded permutation per pass over the data.
    order: list[int] = []
    for epoch in range(1 + cfg.steps * cfg.prompts_per_step // len(records)):
        perm = list(range(len(records)))
        random.Random(f"grpo:{seed}:{epoch}").shuffle(perm)
        order += perm

    base_params = sampling_params(tokenizer, gen_cfg, cfg.num_generations, gen_cfg.max_tokens,
                                  gen_cfg.temperature, gen_cfg.top_p, gen_cfg.min_p, seed=None)
    saved_at = start  # the latest step whose checkpoint exists (0: none is needed)

    def stop(completed: int) -> NoReturn:
        """Preemption: keep the state after ``completed`` steps (its checkpoint) and exit."""
        if completed == 0:  # nothing trained yet: a resumed run starts over, as this one did
            raise_preempted("grpo", 0, None)
        stop_for_preemption(checkpoints, policy, "grpo", completed, choice.state(), saved=saved_at == completed)

    try:
        choice.after_step(start, policy, generator)  # step 0: the start the kept step is held to
    except RolloutsAbandoned:
        stop(start)
    progress = tqdm(total=cfg.steps, initial=start, desc="grpo", disable=not is_rank0())
    for step in range(start, cfg.steps):
        # Under torchrun each rank rolls out and trains on its own prompts (equal shares).
        chosen = shard(order[step * cfg.prompts_per_step : (step + 1) * cfg.prompts_per_step], drop_remainder=True)
        params = dataclasses.replace(base_params, seed=seed * 100_003 + step)
        collected = collect_step(generator, prompts, chosen, params, cfg, step=step, seed=seed)
        # Rollouts can take far longer than a preemption's warning: a stop request abandons
        # them (any rank's), and the run keeps the state after the last complete step.
        if collected is None:
            stop(step)
        rows, generated, step_metrics = collected
        step_metrics.update(rollout_metrics(generated, generated.rollouts))
        if cfg.correctness_first:
            step_metrics["reward/lifted_groups"] = float(sum(all_gather_objects([generated.lifted_groups])))
        if not cfg.dynamic_sampling or step_metrics["dynamic/trained_groups"]:
            step_metrics.update(update_policy(policy, generator, rows, cfg, loss_cfg, int(tokenizer.pad_token_id), step))
        else:  # dynamic sampling found no group whose reward varied: nothing to learn from
            logger.warning("grpo step %d: no group's reward varied in %d rounds; no update", step + 1,
                           int(step_metrics["dynamic/rounds"]))
            step_metrics["train/skipped"] = 1.0
        metrics.log("grpo", step + 1, step_metrics)
        progress.update(1)
        progress.set_postfix(reward=f"{step_metrics['reward/mean']:.3f}", acc=f"{step_metrics['accuracy']:.2f}",
                             len=f"{step_metrics['completion/mean_tokens']:.0f}")
        try:
            choice.after_step(step + 1, policy, generator)
        except RolloutsAbandoned:  # the step is complete; a resumed run evaluates it
            stop(step + 1)
        checkpoints.poll()  # completes an asynchronous checkpoint whose write has finished
        if bool(cfg.save_every_steps) and (step + 1) % cfg.save_every_steps == 0 and step + 1 < cfg.steps:
            choice.save_checkpoint(policy, step + 1)
            saved_at = step + 1
        # After the refit, so that a resumed run's sampler starts from the same weights.
        if step + 1 < cfg.steps and preemption_requested():
            stop(step + 1)
    progress.close()
    return choice.finish(policy)


def update_policy(policy: Policy, generator: Generator, rows: ScoredRows, cfg: GRPOConfig,
                  loss_cfg: GRPOLossConfig, pad_token_id: int, step: int) -> dict[str, float]:
    """Advantages, old and reference logprobs, ``cfg.updates_per_batch`` optimizer steps on
    this rank's ``rows`` and the generator's refit; returns the step's training metrics."""
    out: dict[str, float] = {}
    advantages = group_advantages(rows.rewards, cfg.gfpo.keep or cfg.num_generations, scale_by_std=cfg.scale_rewards)
    batch = rows.to_batch(pad_token_id, cfg.overlong_filter).with_fields(advantages=advantages)

    t0 = time.perf_counter()
    log_mismatch = cfg.mismatch_every_steps > 0 and step % cfg.mismatch_every_steps == 0
    if needs_old_logprobs(cfg, log_mismatch):
        # The trainer's logprobs before any update: the PPO ratio's denominator, TIS's
        # numerator and the yardstick of the rollout engine's numerics. Without them
        # (one update, no TIS) grpo_loss divides by the detached current logprobs: the
        # ratio is exactly 1 and the gradient the same, one forward fewer (as TRL, NeMo-RL).
        old = policy.logprobs(batch)
        batch = batch.with_fields(old_logprobs=old)
        if log_mismatch:
            out.update(logprob_mismatch(old, batch))
    if cfg.beta > 0:  # the weights of policy.snapshot_reference(), swapped in from the host
        batch = batch.with_fields(ref_logprobs=policy.reference_logprobs(batch))
    t_logprobs = time.perf_counter() - t0

    t0 = time.perf_counter()
    micro = micro_batches(batch, policy.micro_batching)
    # the step's totals over every rank's rows: each micro-batch's loss is its share
    loss_fn = functools.partial(grpo_loss, cfg=loss_cfg, totals=step_totals(micro))
    for _ in range(cfg.updates_per_batch):
        with at_step("grpo", step + 1):
            train = policy.train_step(micro, loss_fn)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    generator.update_weights(policy.export_weights())
    out.update(train)
    out.update({"timing/logprobs_s": t_logprobs, "timing/train_s": t_train,
                "timing/refit_s": time.perf_counter() - t0})
    return out


def rollout_metrics(scored: ScoredRows, rollouts: Rollouts,
                    gather: Callable[[list], list] = all_gather_objects) -> dict[str, float]:
    """Reward, accuracy and length metrics of the whole step: ``gather`` concatenates every
    data-parallel rank's rows (a few numbers per row), so rank 0 logs all of them, not its share."""
    names = list(scored.per_reward)
    rows = gather([(float(scored.rewards[i]), bool(scored.correct[i]), len(rollouts.token_ids[i]),
                    rollouts.finish_reasons[i] == "length", [float(scored.per_reward[n][i]) for n in names])
                   for i in range(len(rollouts))])
    rewards = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    lengths = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    out = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "accuracy": sum(r[1] for r in rows) / len(rows),
        "completion/mean_tokens": float(lengths.mean()),
        "completion/min_tokens": float(lengths.min()),
        "completion/max_tokens": float(lengths.max()),
        "completion/truncated_share": sum(r[3] for r in rows) / len(rows),
    }
    out.update({f"reward/{name}": sum(r[4][k] for r in rows) / len(rows) for k, name in enumerate(names)})
    return out


def needs_old_logprobs(cfg: GRPOConfig, log_mismatch: bool) -> bool:
    """Whether a step needs the trainer's logprobs before its first update (a forward of its
    own): for updates after the first (the policy has moved), for TIS, or to log the mismatch."""
    return cfg.updates_per_batch > 1 or cfg.tis_cap is not None or log_mismatch


def logprob_mismatch(trainer_logprobs: torch.Tensor, batch: Batch,
                     reduce: Callable[..., torch.Tensor] = all_reduce_data_parallel) -> dict[str, float]:
    """|generator - trainer| logprobs over generated tokens (train/rollout numerics mismatch),
    over every data-parallel rank's rows: ``reduce(tensor, op)`` sums (or maxes) over ranks."""
    assert batch.rollout_logprobs is not None
    diff = (trainer_logprobs - batch.rollout_logprobs).abs()
    mask = batch.loss_mask
    largest = reduce(torch.where(mask > 0, diff, torch.zeros_like(diff)).max().reshape(1), op="max")
    total, count = reduce(torch.stack([masked_sum(diff, mask), mask.float().sum()]), op="sum").tolist()
    return {
        "rollout/logprob_diff_max": float(largest[0]),
        "rollout/logprob_diff_mean": total / max(count, 1.0),
    }
