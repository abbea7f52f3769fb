"""Correctness comes first: with the rewards every preset uses, no correct completion gets less
total reward than a wrong one of its group (a property over random groups: lengths,
correctness, truncation, formats, prompt budgets), unless grpo.correctness_first=false, which
conf=recipe sets to keep the paper's sum as published and the run's log then says."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmath_nemo.algorithms.scoring import total_rewards
from fastmath_nemo.preflight import load_config
from tests.algorithms._scripted import ScriptedGenerator, grpo_config, run, scripted_completions

PRESETS = ["recipe", "grpo_dapo", "grpo_shorterbetter", "grpo_laser_d", "grpo_l1", "grpo_gfpo"]
TEXTS = ["so \\boxed{7}</think>", "\\boxed{7}", "no answer</think>", "</think> \\boxed{7}"]  # format or not


def _config(name: str):
    cfg = load_config(name)
    cfg.grpo.correctness_first = True  # conf=recipe turns it off; the guarantee is what is tested
    return cfg


CONFIGS = {name: _config(name) for name in PRESETS}


@st.composite
def groups(draw, max_tokens: int, budgets: list[int]):
    """A few groups of one size; each row (text, correct, length, finish reason, budget)."""
    size = draw(st.integers(2, 16))
    rows = []
    for g in range(draw(st.integers(1, 3))):
        budget = draw(st.sampled_from(budgets)) if budgets else None
        for _ in range(size):
            cut = draw(st.booleans())
            length = max_tokens if cut else draw(st.integers(1, max_tokens))
            rows.append((draw(st.sampled_from(TEXTS)), draw(st.booleans()), length, "length" if cut else "stop", g,
                         budget))
    return size, rows


@pytest.mark.parametrize("name", PRESETS)
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_correct_completion_is_rewarded_below_a_wrong_one(name, data) -> None:
    cfg = CONFIGS[name]
    size, rows = data.draw(groups(cfg.generation.max_tokens, list(cfg.grpo.prompt_budget.budgets)))
    texts, correct, lengths, reasons, group_ids, budgets = (list(col) for col in zip(*rows))
    total, _, _ = total_rewards(cfg.grpo, texts, ["7"] * len(rows), lengths, group_ids, size, correct, reasons,
                                budgets if budgets[0] is not None else None)
    for g in set(group_ids):
        right = [float(total[i]) for i in range(len(rows)) if group_ids[i] == g and correct[i]]
        wrong = [float(total[i]) for i in range(len(rows)) if group_ids[i] == g and not correct[i]]
        if right and wrong:
            assert min(right) >= max(wrong) - 1e-6, (g, rows)


def test_the_papers_sum_breaks_the_order_and_the_guarantee_restores_it() -> None:
    """format + cosine (max_len 400) + Kimi length: a correct 399-token completion and a wrong
    390-token one, both formatted: 1 + 0.1 - 0.5 = 0.6 against 1 - 0.1 + 0 = 0.9."""
    cfg = load_config("recipe").grpo
    assert not cfg.correctness_first
    args = (["so \\boxed{7}</think>"] * 2, ["7", "7"], [399, 390], [0, 0], 2, [True, False], ["stop", "stop"], None)
    total, _, lifted = total_rewards(cfg, *args)
    assert total.tolist() == pytest.approx([0.6, 0.9], abs=2e-3) and lifted == 0
    cfg.correctness_first = True
    total, _, lifted = total_rewards(cfg, *args)
    assert total[0] == pytest.approx(total[1]) and lifted == 1


def test_a_run_without_the_guarantee_says_so_at_start(tiny_task, tmp_path, caplog) -> None:
    from tests.algorithms.test_grpo_loop import torch_policy

    generator = ScriptedGenerator(scripted_completions(tiny_task.tokenizer))
    with caplog.at_level(logging.WARNING, logger="fastmath_nemo.algorithms.grpo"):
        run(torch_policy(tiny_task), tiny_task.tokenizer, grpo_config(steps=1, correctness_first=False),
            tmp_path / "off", generator)
    assert "grpo.correctness_first=false" in caplog.text and "accuracy" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastmath_nemo.algorithms.grpo"):
        run(torch_policy(tiny_task), tiny_task.tokenizer, grpo_config(steps=1), tmp_path / "on", generator)
    assert "correctness_first" not in caplog.text
