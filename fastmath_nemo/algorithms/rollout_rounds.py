"""One GRPO step's rows: generate, score, GFPO's filter, dynamic sampling's refill rounds.

    round 0: the step's prompts (this rank's share)                     n completions each
             [L1: each prompt carries a budget drawn for (step, round, prompt)]
    score    -> ScoredRows (algorithms.scoring)
    GFPO     keep k of the n per group (grpo.gfpo.keep)
    dynamic  drop the groups whose total reward does not vary; while fewer groups than
             grpo.prompts_per_step are kept (over all ranks) and rounds are left, generate
             for as many further prompts (a seeded draw per step and round) and repeat;
             then the first prompts_per_step kept groups, dealt out to the ranks again
             (all ranks train as many groups; a remainder below the data-parallel size is
             dropped)

Without dynamic sampling a step is one round and every rank keeps its own rows. Every
decision that would make ranks run different collectives is taken over all ranks.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from fastmath_nemo.algorithms.length_control import gfpo_keep, groups_with_variance
from fastmath_nemo.algorithms.scoring import ScoredRows, score_rollouts
from fastmath_nemo.checkpoint.preemption import preemption_requested
from fastmath_nemo.config.schema import GRPOConfig
from fastmath_nemo.data.chat import prompt_ids
from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.generation.base import Generator, SamplingParams
from fastmath_nemo.utils.distributed import all_gather_objects, data_parallel_size, shard


class StepPrompts:
    """The prompts of a GRPO run: token ids per (record, budget), cached; L1's budget draws."""

    def __init__(self, records: list[MathRecord], tokenizer: PreTrainedTokenizerBase, system_prompt: str | None,
                 cfg: GRPOConfig, seed: int) -> None:
        self.records, self.tokenizer, self.system_prompt = records, tokenizer, system_prompt
        self.budget_cfg, self.seed = cfg.prompt_budget, seed
        self._ids: dict[tuple[int, int | None], list[int]] = {}

    def budget(self, step: int, round_: int, record: int) -> int | None:
        """The budget written into ``record``'s prompt in this step and round (None: no L1)."""
        if not self.budget_cfg.budgets:
            return None
        return random.Random(f"grpo-budget:{self.seed}:{step}:{round_}:{record}").choice(self.budget_cfg.budgets)

    def ids(self, record: int, budget: int | None) -> list[int]:
        key = (record, budget)
        if key not in self._ids:
            problem = self.records[record].problem
            if budget is not None:
                problem = self.budget_cfg.template.format(problem=problem, budget=budget)
            self._ids[key] = prompt_ids(self.tokenizer, problem, self.system_prompt)
        return self._ids[key]


def refill_prompts(seed: int, step: int, round_: int, count: int, n_records: int) -> list[int]:
    """Dynamic sampling's further prompts for ``round_`` >= 1 of ``step``: a seeded draw, so a
    resumed run draws the same ones without any state."""
    rng = random.Random(f"grpo-refill:{seed}:{step}:{round_}")
    return [rng.randrange(n_records) for _ in range(count)]


def collect_step(
    generator: Generator, prompts: StepPrompts, chosen: list[int], params: SamplingParams, cfg: GRPOConfig, *,
    step: int, seed: int, gather: Callable[[list], list] = all_gather_objects,
) -> tuple[ScoredRows, ScoredRows, dict[str, float]] | None:
    """(rows to train on this rank, every row generated on this rank, metrics) for one step;
    None when a stop was requested while generating (the step is abandoned). ``chosen``: this
    rank's share of the step's prompts (record indices); ``params.n`` completions each."""
    group = cfg.gfpo.keep or cfg.num_generations
    generated: list[ScoredRows] = []
    kept: list[ScoredRows] = []
    t_gen = t_score = 0.0
    kept_global = groups_global = rounds = 0
    records = chosen
    while True:
        budgets = [prompts.budget(step, rounds, r) for r in records]
        ids = [prompts.ids(r, b) for r, b in zip(records, budgets)]
        t0 = time.perf_counter()
        generator.wake()
        round_seed = None if params.seed is None else params.seed + 7919 * rounds  # round 0: the step's seed
        rollouts = generator.generate(ids, replace(params, seed=round_seed))
        generator.sleep()
        t_gen += time.perf_counter() - t0
        if preemption_requested():
            return None
        t0 = time.perf_counter()
        scored = score_rollouts(rollouts, ids, [prompts.records[r].answer for r in records], prompts.tokenizer, cfg,
                                None if not budgets or budgets[0] is None else budgets)  # type: ignore[arg-type]
        generated.append(scored)
        if cfg.gfpo.keep is not None:
            lengths = [len(t) for t in scored.rollouts.token_ids]
            scored = scored.select(gfpo_keep(lengths, scored.rewards, cfg.num_generations, cfg.gfpo.keep,
                                             cfg.gfpo.metric))
        if cfg.dynamic_sampling:
            varied = groups_with_variance(scored.rewards, group)
            scored = scored.select([i for i in range(len(scored)) if varied[i // group]])
        kept.append(scored)
        t_score += time.perf_counter() - t0
        rounds += 1
        if not cfg.dynamic_sampling:
            break
        counts = gather([(len(scored) // group, len(records))])
        kept_global += sum(k for k, _ in counts)
        groups_global += sum(n for _, n in counts)
        missing = cfg.prompts_per_step - kept_global
        if missing <= 0 or rounds > cfg.dynamic_sampling_max_rounds:
            break
        dp = data_parallel_size()
        records = shard(refill_prompts(seed, step, rounds, math.ceil(missing / dp) * dp, len(prompts.records)))

    rows = ScoredRows.concat(kept)
    metrics: dict[str, float] = {"timing/generation_s": t_gen, "timing/scoring_s": t_score}
    if cfg.dynamic_sampling:
        rows = _deal_out(rows, group, cfg.prompts_per_step, gather)
        metrics.update({"dynamic/rounds": float(rounds), "dynamic/kept_share": kept_global / max(groups_global, 1),
                        "dynamic/trained_groups": float(sum(gather([len(rows) // group])))})
    if cfg.gfpo.keep is not None:
        lengths = gather([len(t) for t in rows.rollouts.token_ids])
        metrics["gfpo/kept_mean_tokens"] = sum(lengths) / max(len(lengths), 1)
    return rows, ScoredRows.concat(generated), metrics


def _deal_out(rows: ScoredRows, group: int, wanted: int, gather: Callable[[list], list]) -> ScoredRows:
    """The first ``wanted`` kept groups of all ranks (rank 0's first, each rank's in its
    order of rounds), trimmed to a multiple of the data-parallel size and dealt out again."""
    mine = [rows.select(list(range(g * group, (g + 1) * group))) for g in range(len(rows) // group)]
    everyone = gather(mine)[:wanted]
    share = shard(everyone, drop_remainder=True)
    if not share:
        return rows.select([])
    return ScoredRows.concat(share)
