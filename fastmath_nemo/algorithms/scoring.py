"""A GRPO step's scored rows: decode, verify once, weighted rewards, the training batch."""

from __future__ import annotations

import dataclasses
import functools

import torch
from transformers import PreTrainedTokenizerBase

from fastmath_nemo.algorithms.length_control import lift_correct_above_wrong
from fastmath_nemo.batching.batch import Batch, batch_from_sequences
from fastmath_nemo.config.schema import GRPOConfig
from fastmath_nemo.generation.base import Rollouts
from fastmath_nemo.rewards.functions import completion_lengths, compute_rewards
from fastmath_nemo.rewards.verify import verify_pairs
from fastmath_nemo.utils.distributed import map_over_replica, once_per_replica


@dataclasses.dataclass
class ScoredRows:
    """N completions, group-major (``rollouts.prompt_index[i]`` is row i's group, 0..P-1).

    prompts[p]:   the prompt ids of group p
    texts:        [N] decoded completions; correct: [N] verified against the group's answer
    rewards:      [N] weighted total (after grpo.correctness_first's lift)
    per_reward:   {name: [N]} each reward before weighting
    lifted_groups: groups whose correct completions grpo.correctness_first lifted when these
                  rows were scored (summed by ``concat``; a selection's own count is unknown: 0)
    """

    prompts: list[list[int]]
    rollouts: Rollouts
    texts: list[str]
    correct: list[bool]
    rewards: torch.Tensor
    per_reward: dict[str, torch.Tensor]
    lifted_groups: int = 0

    def __len__(self) -> int:
        return len(self.rollouts)

    def select(self, rows: list[int]) -> "ScoredRows":
        """Rows ``rows`` (whole groups or parts of them, in order); groups renumbered 0.. in
        order of first appearance, prompts with them."""
        groups: dict[int, int] = {}
        for i in rows:
            groups.setdefault(self.rollouts.prompt_index[i], len(groups))
        r = self.rollouts
        picked = Rollouts([groups[r.prompt_index[i]] for i in rows], [r.token_ids[i] for i in rows],
                          [r.logprobs[i] for i in rows], [r.finish_reasons[i] for i in rows])
        index = torch.tensor(rows, dtype=torch.long)
        return ScoredRows([self.prompts[g] for g in groups], picked, [self.texts[i] for i in rows],
                          [self.correct[i] for i in rows], self.rewards[index],
                          {k: v[index] for k, v in self.per_reward.items()})

    @staticmethod
    def concat(parts: list["ScoredRows"]) -> "ScoredRows":
        """The rows of ``parts`` one after another (groups renumbered); lifted groups summed."""
        if len(parts) == 1:
            return parts[0]
        rollouts, prompts = Rollouts(), []
        for part in parts:
            rollouts.prompt_index += [len(prompts) + p for p in part.rollouts.prompt_index]
            rollouts.token_ids += part.rollouts.token_ids
            rollouts.logprobs += part.rollouts.logprobs
            rollouts.finish_reasons += part.rollouts.finish_reasons
            prompts += part.prompts
        return ScoredRows(prompts, rollouts, [t for p in parts for t in p.texts], [c for p in parts for c in p.correct],
                          torch.cat([p.rewards for p in parts]),
                          {k: torch.cat([p.per_reward[k] for p in parts]) for k in parts[0].per_reward},
                          sum(p.lifted_groups for p in parts))

    def to_batch(self, pad_token_id: int, overlong_filter: bool = False) -> Batch:
        """Prompt + completion rows, ``loss_mask`` on completion tokens (none on a completion
        cut by max_tokens with ``overlong_filter``: DAPO), the generator's logprobs aligned."""
        sequences, masks, logprobs = [], [], []
        for p, completion, lps, reason in zip(self.rollouts.prompt_index, self.rollouts.token_ids,
                                              self.rollouts.logprobs, self.rollouts.finish_reasons):
            prompt = self.prompts[p]
            sequences.append(prompt + completion)
            trained = 0 if overlong_filter and reason == "length" else 1
            masks.append([0] * len(prompt) + [trained] * len(completion))
            logprobs.append([0.0] * len(prompt) + lps)
        batch = batch_from_sequences(sequences, masks, pad_token_id)
        padded = torch.zeros_like(batch.loss_mask)
        for i, lps in enumerate(logprobs):
            padded[i, : len(lps)] = torch.tensor(lps)
        return batch.with_fields(rollout_logprobs=padded)


def score_rollouts(
    rollouts: Rollouts, prompts: list[list[int]], golds: list[str], tokenizer: PreTrainedTokenizerBase,
    cfg: GRPOConfig, budgets: list[int] | None = None,
) -> ScoredRows:
    """Decode, verify once and compute the weighted rewards of ``rollouts`` (groups of
    ``len(rollouts) / len(prompts)``); ``golds[p]``, ``budgets[p]`` belong to prompt p.

    Once per model replica: its ranks (TP / PP / CP peers, the same rollouts) split the
    verification and share the verdicts, and its first rank computes the rewards for all."""
    texts = tokenizer.batch_decode(rollouts.token_ids, skip_special_tokens=True)
    row_golds = [golds[p] for p in rollouts.prompt_index]
    correct = map_over_replica(functools.partial(verify_pairs, timeout_s=cfg.verify_timeout_s),
                               list(zip(texts, row_golds)))
    lengths = completion_lengths(texts, [len(t) for t in rollouts.token_ids], cfg.length_unit)
    row_budgets = None if budgets is None else [budgets[p] for p in rollouts.prompt_index]
    group_size = len(rollouts) // max(len(prompts), 1)
    total, per_reward, lifted = once_per_replica(lambda: total_rewards(
        cfg, texts, row_golds, lengths, rollouts.prompt_index, group_size, correct, rollouts.finish_reasons,
        row_budgets))
    return ScoredRows(prompts, rollouts, texts, correct, total, per_reward, lifted)


def total_rewards(
    cfg: GRPOConfig, texts: list[str], golds: list[str], lengths: list[int], group_ids: list[int], group_size: int,
    correct: list[bool], finish_reasons: list[str], budgets: list[int] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(total [N], {reward: [N]}, groups lifted): ``cfg.rewards`` weighted and summed, then,
    with ``cfg.correctness_first``, no correct completion below a wrong one of its group."""
    specs = [(r.name, r.weight, dict(r.kwargs)) for r in cfg.rewards]
    total, per_reward = compute_rewards(specs, texts, golds, lengths, group_ids, correct=correct,
                                        timeout_s=cfg.verify_timeout_s, finish_reasons=finish_reasons, budgets=budgets)
    lifted = 0
    if cfg.correctness_first and len(texts):
        total, lifted = lift_correct_above_wrong(total, correct, group_size)
    return total, per_reward, lifted
