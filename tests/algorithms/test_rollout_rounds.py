"""One step's rows with dynamic sampling and GFPO (algorithms.rollout_rounds), scripted rollouts.

Every prompt gets the same two completions, ``\\boxed{7}`` (longer) and ``\\boxed{8}``: a
problem whose answer is 7 or 8 has one right and one wrong (its rewards vary), one whose
answer is 9 has none right (accuracy rewards 0, 0: no signal)."""

from __future__ import annotations

import pytest
import torch

from fastmath_nemo.algorithms.rollout_rounds import StepPrompts, collect_step, refill_prompts
from fastmath_nemo.config.schema import GFPOConfig, RewardSpec
from fastmath_nemo.data.records import MathRecord
from fastmath_nemo.generation.base import SamplingParams
from tests.algorithms._scripted import SYSTEM_PROMPT, ScriptedGenerator, grpo_config, scripted_completions

ANSWERS = ["9", "9", "7", "9", "8", "7", "8", "7", "8", "9"]
RECORDS = [MathRecord(problem=f"Problem {i}?", answer=a) for i, a in enumerate(ANSWERS)]


def _collect(tokenizer, cfg, chosen, generator=None, step=0):
    generator = generator or ScriptedGenerator(scripted_completions(tokenizer))
    prompts = StepPrompts(RECORDS, tokenizer, SYSTEM_PROMPT, cfg, seed=5)
    params = SamplingParams(n=cfg.num_generations, seed=11)
    return collect_step(generator, prompts, chosen, params, cfg, step=step, seed=5), generator


def test_dynamic_sampling_refills_the_step_from_further_prompts(tiny_task) -> None:
    cfg = grpo_config(prompts_per_step=2, dynamic_sampling=True, dynamic_sampling_max_rounds=5)
    (rows, generated, metrics), generator = _collect(tiny_task.tokenizer, cfg, chosen=[0, 1])  # both no signal
    # the rounds' prompts are the seeded draws; the first two that vary are trained on
    drawn, rounds = [0, 1], 1
    while sum(ANSWERS[r] != "9" for r in drawn) < 2 and rounds <= 5:
        drawn += refill_prompts(5, 0, rounds, 2 - sum(ANSWERS[r] != "9" for r in drawn), len(RECORDS))
        rounds += 1
    varied = [r for r in drawn if ANSWERS[r] != "9"][:2]
    assert len(varied) == 2 and metrics["dynamic/rounds"] == rounds and 1 < rounds <= 6
    assert metrics["dynamic/trained_groups"] == 2
    assert metrics["dynamic/kept_share"] == pytest.approx(sum(ANSWERS[r] != "9" for r in drawn) / len(drawn))
    assert len(generated) == 2 * len(drawn) and len(rows) == 4
    assert rows.correct == [ANSWERS[r] == boxed for r in varied for boxed in ("7", "8")]
    assert rows.prompts == [generated.prompts[drawn.index(r)] for r in varied]
    # each round had its own seed: the same prompts are not sampled alike twice
    assert len({c.seed for c in generator.calls}) == rounds


def test_dynamic_sampling_keeps_all_correct_groups_whose_lengths_are_rewarded(tiny_task) -> None:
    right, _ = scripted_completions(tiny_task.tokenizer)
    short = tiny_task.tokenizer.encode("\\boxed{7}</think>", add_special_tokens=False)
    both_right = ScriptedGenerator([right, (short, [-1.0] * len(short), "stop")])
    accuracy = grpo_config(dynamic_sampling=True, dynamic_sampling_max_rounds=0)
    (rows, _, metrics), _ = _collect(tiny_task.tokenizer, accuracy, [2, 7], both_right)
    assert len(rows) == 0 and metrics["dynamic/kept_share"] == 0.0  # 1, 1: nothing to learn
    with_length = grpo_config(dynamic_sampling=True, dynamic_sampling_max_rounds=0,
                              rewards=[RewardSpec("accuracy", 1.0), RewardSpec("kimi_length", 1.0)])
    (rows, _, metrics), _ = _collect(tiny_task.tokenizer, with_length, [2, 7], both_right)
    assert len(rows) == 4 and metrics["dynamic/kept_share"] == 1.0  # 0.5, 1.5: the shorter is better
    assert rows.rewards.tolist() == [0.5, 1.5, 0.5, 1.5]


def test_gfpo_trains_the_shortest_completions_of_a_larger_group(tiny_task) -> None:
    tokenizer = tiny_task.tokenizer
    texts = ["so so so \\boxed{7}</think>", "\\boxed{7}</think>", "so \\boxed{8}</think>", "\\boxed{8}</think>"]
    completions = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        completions.append((ids, [-1.0] * len(ids), "stop"))
    cfg = grpo_config(num_generations=4, gfpo=GFPOConfig(keep=2))
    (rows, generated, metrics), _ = _collect(tokenizer, cfg, [2, 4], ScriptedGenerator(completions))
    assert len(generated) == 8 and len(rows) == 4
    kept = [tokenizer.decode(t) for t in rows.rollouts.token_ids]
    assert kept == [texts[1], texts[3]] * 2  # the two shortest of each four
    assert rows.correct == [True, False, False, True]  # problem 2's answer is 7, problem 4's is 8
    assert rows.rollouts.prompt_index == [0, 0, 1, 1]
    assert metrics["gfpo/kept_mean_tokens"] == pytest.approx(sum(len(t) for t in rows.rollouts.token_ids) / 4)


def test_prompt_budgets_are_written_into_the_prompts_and_reach_the_reward(tiny_task) -> None:
    tokenizer = tiny_task.tokenizer
    cfg = grpo_config(rewards=[RewardSpec("lcpo_exact", 1.0, {"alpha": 0.01})])
    cfg.prompt_budget.budgets = [30, 60]
    (rows, _, _), _ = _collect(tokenizer, cfg, [2, 4])
    prompts = StepPrompts(RECORDS, tokenizer, SYSTEM_PROMPT, cfg, seed=5)
    budgets = [prompts.budget(0, 0, r) for r in (2, 4)]
    for prompt, budget in zip(rows.prompts, budgets):
        assert tokenizer.decode(prompt).count(f"Think for {budget} tokens.") == 1
    lengths = [len(t) for t in rows.rollouts.token_ids]
    expected = [float(ok) - 0.01 * abs(budgets[i // 2] - n) for i, (ok, n) in enumerate(zip(rows.correct, lengths))]
    assert rows.rewards.tolist() == pytest.approx(expected)
    # the draws are seeded per step, round and problem: a resumed run writes the same budgets
    assert [prompts.budget(0, 0, r) for r in (2, 4)] == budgets
    assert len({prompts.budget(s, 0, 2) for s in range(20)}) == 2


def test_overlong_filter_masks_truncated_completions_out_of_the_loss(tiny_task) -> None:
    right, wrong = scripted_completions(tiny_task.tokenizer)
    cut = ScriptedGenerator([right, (wrong[0], wrong[1], "length")])
    (rows, _, _), _ = _collect(tiny_task.tokenizer, grpo_config(overlong_filter=True), [2], cut)
    batch = rows.to_batch(int(tiny_task.tokenizer.pad_token_id), overlong_filter=True)
    assert batch.loss_mask[0].sum() == len(right[0]) and batch.loss_mask[1].sum() == 0
    unfiltered = rows.to_batch(int(tiny_task.tokenizer.pad_token_id))
    assert unfiltered.loss_mask[1].sum() == len(wrong[0])
    assert torch.equal(batch.input_ids, unfiltered.input_ids)


def test_a_step_without_any_signal_makes_no_update(tiny_task, tmp_path) -> None:
    """run_grpo with dynamic sampling where every completion is right (rewards 1, 1): each step
    logs its rounds and that it skipped the update, and the weights do not move."""
    from tests.algorithms._scripted import run
    from tests.algorithms.test_grpo_loop import torch_policy

    right, _ = scripted_completions(tiny_task.tokenizer)
    policy = torch_policy(tiny_task)
    before = [p.detach().clone() for p in policy.model.parameters()]
    cfg = grpo_config(dynamic_sampling=True, dynamic_sampling_max_rounds=1)
    records = run(policy, tiny_task.tokenizer, cfg, tmp_path, ScriptedGenerator([right, right]))
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["train/skipped"] == 1.0 and record["dynamic/rounds"] == 2.0 and "loss" not in record
        assert record["accuracy"] == 1.0 and record["dynamic/kept_share"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))


def test_two_ranks_refill_together_and_train_as_many_groups(tiny_task, tmp_path) -> None:
    """Data-parallel ranks decide the rounds together and deal the kept groups out again: the
    step's four problems (0, 1, 3, 9) have no signal, the refills find some on one rank or the
    other, and each rank trains two groups that vary, with the same metrics on both."""
    import json

    import torch.multiprocessing as mp

    from tests._distributed_ranks import dynamic_sampling_step

    mp.spawn(dynamic_sampling_step, args=(str(tmp_path / "init"), str(tmp_path), tiny_task.tokenizer), nprocs=2,
             join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r["groups"]) for r in ranks] == [2, 2]
    for r in ranks:
        assert all(a != b for a, b in zip(r["rewards"][::2], r["rewards"][1::2]))  # each group varies
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"]["dynamic/trained_groups"] == 4 and ranks[0]["metrics"]["dynamic/rounds"] > 1
    drawn = sum(r["generated"] for r in ranks) // 2  # problems generated for (two completions each), both ranks
    assert ranks[0]["metrics"]["dynamic/kept_share"] >= 4 / drawn
