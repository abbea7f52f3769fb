"""score_rollouts: rewards see each completion's finish reason (the cosine reward's
exceed-length penalty applies to completions cut at max_tokens only)."""

from __future__ import annotations

from fastmath_nemo.algorithms.grpo import score_rollouts
from fastmath_nemo.config.schema import GRPOConfig, RewardSpec
from fastmath_nemo.generation.base import Rollouts


def test_truncated_completion_gets_the_exceed_length_penalty(tiny_task) -> None:
    tokenizer = tiny_task.tokenizer
    prompts = tiny_task.prompts(1)
    rollouts = Rollouts()
    for text, reason in (("so \\boxed{3}</think>", "stop"), ("so \\boxed{3}</think>", "length")):
        rollouts.prompt_index.append(0)
        rollouts.token_ids.append(tokenizer.encode(text, add_special_tokens=False))
        rollouts.logprobs.append([0.0] * len(rollouts.token_ids[-1]))
        rollouts.finish_reasons.append(reason)
    cfg = GRPOConfig(rewards=[RewardSpec("cosine", 1.0, {"max_len": 100, "exceed_length_penalty": -5.0})])
    scored = score_rollouts(rollouts, prompts, ["3"], tokenizer, cfg)
    assert scored.correct == [True, True]
    # the same text: the stopped one is rewarded as correct, the truncated one gets the penalty
    assert float(scored.rewards[0]) > 0.1
    assert float(scored.rewards[1]) == -5.0
