"""Test helper: a Generator that samples nothing (fixed completions), and the GRPO setup the loop
tests share (two problems with the same answer, one right and one wrong completion each)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from fastmath_nemo.algorithms.grpo import run_grpo
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.config.schema import GenerationConfig, GRPOConfig, OptimizerConfig, RewardSpec
from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.generation.base import Rollouts, SamplingParams
from fastmath_nemo.utils.metrics_logger import MetricsLogger, read_metrics

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# Same answer, so one scripted completion is right (reward 1) and the other wrong (0) for both.
RECORDS = [MathRecord(problem="What is 3+4?", answer="7"), MathRecord(problem="What is 2+5?", answer="7")]
TEXTS = ("so the answer is \\boxed{7}</think>", "\\boxed{8}</think>")  # right (longer), wrong


class ScriptedGenerator:
    """The Generator protocol without sampling: completion ``j`` of every prompt is
    ``completions[j]`` (token ids, per-token logprobs, finish reason). Records the refits."""

    def __init__(self, completions: list[tuple[list[int], list[float], str]]) -> None:
        self.completions = completions
        self.calls: list[SamplingParams] = []
        self.refits = 0

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress: str | None = None) -> Rollouts:
        assert params.n == len(self.completions), (params.n, len(self.completions))
        self.calls.append(params)
        out = Rollouts()
        for p in range(len(prompt_ids)):
            for ids, logprobs, reason in self.completions:
                out.prompt_index.append(p)
                out.token_ids.append(list(ids))
                out.logprobs.append(list(logprobs))
                out.finish_reasons.append(reason)
        return out

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for _ in weights:
            pass
        self.refits += 1

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


def scripted_completions(tokenizer, rollout_logprob: float = -1.0) -> list[tuple[list[int], list[float], str]]:
    """TEXTS as token ids ending in EOS, each token with ``rollout_logprob``."""
    out = []
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False) + [int(tokenizer.eos_token_id)]
        out.append((ids, [rollout_logprob] * len(ids), "stop"))
    return out


def grpo_config(**overrides) -> GRPOConfig:
    """Two steps of both problems x two generations, accuracy reward only, no KL by default."""
    settings = dict(steps=2, prompts_per_step=2, num_generations=2, beta=0.0, rewards=[RewardSpec("accuracy", 1.0)],
                    optimizer=OptimizerConfig(lr=1e-2, warmup_ratio=0.0), save_every_steps=0)
    settings.update(overrides)
    return GRPOConfig(**settings)


GEN = GenerationConfig(max_tokens=40)


def run(policy, tokenizer, cfg: GRPOConfig, stage_dir: Path, generator: ScriptedGenerator, *,
        resume: bool = False) -> list[dict]:
    """``run_grpo`` with ``generator``; returns the stage's metrics records (resume rule applied)."""
    checkpoints = CheckpointManager(stage_dir, tokenizer, cfg.keep_last_checkpoints)
    with MetricsLogger(stage_dir / "metrics.jsonl", enabled=True) as metrics:
        run_grpo(policy, generator, tokenizer, RECORDS, cfg, GEN, SYSTEM_PROMPT, checkpoints, metrics, seed=3,
                 resume=resume)
    return [r for r in read_metrics(stage_dir / "metrics.jsonl") if r["stage"] == "grpo"]
