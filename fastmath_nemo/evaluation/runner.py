"""Evaluation in the paper's protocol: n samples per problem, generation stops at
``</think>`` or the token budget, the last boxed answer is graded with math-verify."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from fastmath_nemo.config.schema import EvalConfig, GenerationConfig
from fastmath_nemo.data.chat import prompt_ids
from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.evaluation.metrics import summarize
from fastmath_nemo.evaluation.samples import EvalSample, write_samples
from fastmath_nemo.generation.base import Generator, RolloutsAbandoned
from fastmath_nemo.generation.params import sampling_params
from fastmath_nemo.rewards.extract import last_boxed_answer
from fastmath_nemo.rewards.verify import verify_pairs
from fastmath_nemo.utils.distributed import all_gather_objects, any_rank, is_rank0, map_over_replica, shard

logger = logging.getLogger(__name__)


def evaluate(
    generator: Generator,
    tokenizer: PreTrainedTokenizerBase,
    records: list[MathRecord],
    cfg: EvalConfig,
    gen_cfg: GenerationConfig,
    token_budget: int,
    system_prompt: str | None,
    verify_timeout_s: float = 2.0,
    *,
    label: str = "eval",
    samples_path: Path | None = None,
) -> dict[str, Any]:
    """Summary metrics (pass@1, maj@k, mean output tokens, truncated share) at one budget.
    Under torchrun each rank generates for its share of the problems; samples are gathered.
    A stop request abandons the rollouts: ``RolloutsAbandoned`` on every rank.
    Rank 0 shows a progress bar labelled ``label`` while generating and writes every rank's
    samples to ``samples_path`` (``evaluation.samples``) when one is given."""
    problem_ids = shard(list(range(len(records))))
    records = [records[i] for i in problem_ids]
    prompts = [prompt_ids(tokenizer, r.problem, system_prompt) for r in records]
    params = sampling_params(tokenizer, gen_cfg, cfg.n_samples, token_budget, cfg.temperature, cfg.top_p,
                             cfg.min_p, seed=cfg.seed)
    t0 = time.perf_counter()
    rollouts = generator.generate(prompts, params, progress=label if is_rank0() else None)
    if any_rank(rollouts.abandoned):  # a collective: every rank leaves together
        raise RolloutsAbandoned(f"{label}: a stop was requested while generating; nothing is recorded")
    elapsed = time.perf_counter() - t0
    texts = tokenizer.batch_decode(rollouts.token_ids, skip_special_tokens=True)
    # a model replica's ranks hold the same samples: they split the verification
    correct = map_over_replica(functools.partial(verify_pairs, timeout_s=verify_timeout_s),
                               [(text, records[p].answer) for text, p in zip(texts, rollouts.prompt_index)])
    seen: dict[int, int] = {}  # completions so far per prompt: the sample's index
    samples = []
    for p, text, ok, ids, reason in zip(rollouts.prompt_index, texts, correct, rollouts.token_ids,
                                        rollouts.finish_reasons, strict=True):
        seen[p] = seen.get(p, -1) + 1
        samples.append(EvalSample(problem_id=problem_ids[p], sample=seen[p], problem=records[p].problem,
                                  gold=records[p].answer, completion=text, extracted_answer=last_boxed_answer(text),
                                  correct=ok, tokens=len(ids), finish_reason=reason))
    samples = all_gather_objects(samples)
    if samples_path is not None and is_rank0():
        write_samples(samples_path, samples)
        # The two usual reasons for a pass@1 of 0, said where the person running it looks.
        unboxed = sum(s.extracted_answer is None for s in samples) / len(samples)
        cut = sum(s.finish_reason == "length" for s in samples) / len(samples)
        logger.info("%s: %d samples in %s (%.0f%% without a \\boxed{} answer, %.0f%% cut by the %d-token budget)",
                    label, len(samples), samples_path, 100 * unboxed, 100 * cut, token_budget)
    summary = summarize([s.result() for s in sorted(samples, key=lambda s: (s.problem_id, s.sample))],
                        cfg.k_values, bootstrap_resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    summary["generation_s"] = elapsed
    summary["tokens_per_s"] = sum(s.tokens for s in samples) / max(elapsed, 1e-9)
    return summary
