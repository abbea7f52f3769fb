"""Evaluation in the paper's protocol: n samples per problem, generation stops at
``</think>`` or the token budget, the last boxed answer is graded with math-verify."""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import PreTrainedTokenizerBase

from fastmath_nemo.algorithms.grpo import sampling_params
from fastmath_nemo.config.schema import EvalConfig, GenerationConfig
from fastmath_nemo.data.chat import prompt_ids
from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.evaluation.metrics import SampleResult, summarize
from fastmath_nemo.generation.base import Generator
from fastmath_nemo.rewards.extract import last_boxed_answer
from fastmath_nemo.rewards.verify import verify_many
from fastmath_nemo.utils.distributed import all_gather_objects, shard

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
) -> dict[str, Any]:
    """Summary metrics (pass@1, maj@k, mean output tokens, truncated share) at one budget.
    Under torchrun each rank generates for its share of the problems; samples are gathered."""
    problem_ids = shard(list(range(len(records))))
    records = [records[i] for i in problem_ids]
    prompts = [prompt_ids(tokenizer, r.problem, system_prompt) for r in records]
    params = sampling_params(tokenizer, gen_cfg, cfg.n_samples, token_budget, cfg.temperature, cfg.top_p,
                             cfg.min_p, seed=cfg.seed)
    t0 = time.perf_counter()
    rollouts = generator.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    texts = tokenizer.batch_decode(rollouts.token_ids, skip_special_tokens=True)
    correct = verify_many(texts, [records[p].answer for p in rollouts.prompt_index], verify_timeout_s)
    samples = [
        SampleResult(problem_id=problem_ids[p], answer=last_boxed_answer(text), correct=ok, num_tokens=len(ids),
                     truncated=reason == "length")
        for p, text, ok, ids, reason in zip(rollouts.prompt_index, texts, correct, rollouts.token_ids,
                                            rollouts.finish_reasons)
    ]
    samples = all_gather_objects(samples)
    summary = summarize(samples, cfg.k_values)
    summary["generation_s"] = elapsed
    summary["tokens_per_s"] = sum(s.num_tokens for s in samples) / max(elapsed, 1e-9)
    return summary
