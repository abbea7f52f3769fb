"""Stage 1 of the recipe: long supervised fine-tuning on reasoning traces.

    for epoch in 1..E:                      # the paper finds up to 10 epochs essential
        for rows in packed batches:         # several conversations per row, no cross-attention
            loss = NLL(assistant tokens)    # exact token mean over the whole step
            AdamW step, cosine LR with warmup, clipped gradients
        optionally evaluate                 # reproduces the paper's epoch ablation
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fastmath_nemo.algorithms.losses import sft_loss
from fastmath_nemo.batching.batch import Batch
from fastmath_nemo.batching.micro_batches import micro_batches
from fastmath_nemo.batching.step_totals import step_totals
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.checkpoint.preemption import preemption_requested, stop_for_preemption
from fastmath_nemo.config.schema import SFTConfig
from fastmath_nemo.data.chat import sft_example
from fastmath_nemo.data.packing import Example, fit_to_length, packed_step_batches, unpacked_batch
from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.generation.base import RolloutsAbandoned
from fastmath_nemo.policy.base import Policy
from fastmath_nemo.policy.optimization import at_step
from fastmath_nemo.utils.distributed import data_parallel_rank, data_parallel_size, is_rank0
from fastmath_nemo.utils.metrics_logger import MetricsLogger

logger = logging.getLogger(__name__)
LOG_EVERY = 25  # steps between console summaries (metrics.jsonl gets every step)


@dataclass
class SFTData:
    examples: list[Example]
    pad_id: int


def tokenize_sft(
    records: list[MathRecord], tokenizer: PreTrainedTokenizerBase, system_prompt: str | None, max_seq_len: int
) -> SFTData:
    """Chat-format every record; conversations over ``max_seq_len`` are cut (with a warning)."""
    missing = [r.source for r in records if not r.trace]
    if missing:
        raise ValueError(f"SFT needs a trace for every record; missing in {missing[:3]} ({len(missing)} total)")
    examples = [
        sft_example(tokenizer, r.problem, r.trace or "", system_prompt)
        for r in tqdm(records, desc="tokenize sft", disable=not is_rank0(), leave=False)
    ]
    return SFTData(fit_to_length(examples, max_seq_len), int(tokenizer.pad_token_id))


def step_batches(data: SFTData, cfg: SFTConfig, seed: int, epoch: int) -> list[Batch]:
    """The optimizer-step batches of one epoch (``cfg.rows_per_step`` rows each). Under
    torchrun every rank builds the same list; a tail batch with fewer rows than ranks is
    dropped so that all ranks take the same number of steps."""
    return [b for b in _all_step_batches(data, cfg, seed, epoch) if b.num_rows >= data_parallel_size()]


def _all_step_batches(data: SFTData, cfg: SFTConfig, seed: int, epoch: int) -> list[Batch]:
    if cfg.packing:
        return list(
            packed_step_batches(
                data.examples, max_len=cfg.max_seq_len, pad_id=data.pad_id,
                rows_per_step=cfg.rows_per_step, seed=seed, epoch=epoch,
            )
        )
    rng = random.Random(f"sft:{seed}:{epoch}")
    order = list(range(len(data.examples)))
    rng.shuffle(order)
    # Group similar lengths (as HF's group_by_length) so little is padding. The price: where
    # length follows a behaviour (here, the number of self-checks), each step teaches it one
    # way only, and what the model ends with depends on the order of the last steps.
    # Without grouping, the window is the whole shuffled epoch, unsorted.
    window = cfg.rows_per_step * 16 if cfg.group_by_length else len(order)
    batches = []
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        if cfg.group_by_length:
            chunk.sort(key=lambda i: len(data.examples[i][0]))
        batches += [chunk[s : s + cfg.rows_per_step] for s in range(0, len(chunk), cfg.rows_per_step)]
    if cfg.group_by_length:
        rng.shuffle(batches)
    return [unpacked_batch([data.examples[i] for i in rows], data.pad_id) for rows in batches]


def local_rows(batch: Batch) -> Batch:
    """This rank's rows of a step batch: equal shares (remainder dropped) for DDP."""
    n = data_parallel_size()
    usable = batch.num_rows - batch.num_rows % n
    return batch.select(slice(data_parallel_rank(), usable, n))


def run_sft(
    policy: Policy,
    data: SFTData,
    cfg: SFTConfig,
    checkpoints: CheckpointManager,
    metrics: MetricsLogger,
    *,
    seed: int,
    resume: bool = False,
    on_epoch_end: Callable[[int], dict[str, float]] | None = None,
) -> None:
    """SFT for ``cfg.epochs`` epochs. Each step's rows on this rank become micro-batches as
    ``policy.micro_batching`` says (by rows or by a token budget); the loss is the token mean
    over the whole step."""
    steps_per_epoch = len(step_batches(data, cfg, seed, 0))
    total_steps = cfg.epochs * steps_per_epoch
    policy.setup_optimizer(cfg.optimizer, total_steps)
    start, unevaluated = 0, None
    if resume and (latest := checkpoints.latest()) is not None:
        state = policy.load(latest)
        start, unevaluated = int(state["step"]), state.get("evaluate_epoch")
        logger.info("resuming SFT from %s (step %d of %d)", latest, start, total_steps)
        for stage in ("sft", "sft_eval"):  # supersede steps a killed run logged after its checkpoint
            metrics.resume(stage, start)
    logger.info("SFT: %d examples, %d epochs x %d steps", len(data.examples), cfg.epochs, steps_per_epoch)

    def evaluate_epoch(epoch: int, step: int) -> None:
        """The evaluation after ``epoch`` epochs (``step`` steps); a stop request during it
        keeps that step, marked for the evaluation a resumed run then makes first."""
        if not cfg.eval_every_epoch or on_epoch_end is None:
            return
        try:
            metrics.log("sft_eval", step, {"epoch": epoch, **on_epoch_end(epoch)})
        except RolloutsAbandoned:
            stop_for_preemption(checkpoints, policy, "sft", step, {"epoch": epoch - 1, "evaluate_epoch": epoch})

    if unevaluated is not None:  # the run stopped in this epoch's evaluation
        evaluate_epoch(int(unevaluated), start)

    progress = tqdm(total=total_steps, initial=start, desc="sft", disable=not is_rank0())
    step = start
    saved = False  # whether this step's checkpoint was already written
    for epoch in range(start // steps_per_epoch, cfg.epochs):
        batches = step_batches(data, cfg, seed, epoch)
        for batch in batches[step - epoch * steps_per_epoch :]:
            local = local_rows(batch)
            micro = micro_batches(local, policy.micro_batching)
            # sft_loss divides by the step's target tokens (all micro-batches, all ranks) and
            # train_step sums the shares: the exact token mean of the rows trained in this step.
            with at_step("sft", step + 1):
                result = policy.train_step(micro, functools.partial(sft_loss, totals=step_totals(micro)))
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{result['loss']:.4f}", epoch=epoch + 1)
            metrics.log("sft", step, {**result, "epoch": epoch + (step - epoch * steps_per_epoch) / steps_per_epoch},
                        console=step % LOG_EVERY == 0)
            checkpoints.poll()  # completes an asynchronous checkpoint whose write has finished
            saved = bool(cfg.save_every_steps) and step % cfg.save_every_steps == 0 and step < total_steps
            if saved:
                checkpoints.save(policy, step, {"epoch": epoch})
            # One collective check per step; an epoch's last step is checked after its evaluation,
            # so a resumed run has every epoch's evaluation, as an uninterrupted one.
            if step % steps_per_epoch and preemption_requested():
                stop_for_preemption(checkpoints, policy, "sft", step, {"epoch": epoch}, saved=saved)
        evaluate_epoch(epoch + 1, step)
        if step < total_steps and preemption_requested():
            stop_for_preemption(checkpoints, policy, "sft", step, {"epoch": epoch}, saved=saved)
    progress.close()
    checkpoints.save_final(policy, {"step": step})
