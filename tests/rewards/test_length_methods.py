"""The other length-control methods' rewards, against numbers derived by hand from their formulas."""

from __future__ import annotations

import pytest

from fastmath_nemo.rewards.functions import check_reward_kwargs, compute_rewards
from fastmath_nemo.rewards.length_methods import (
    dapo_overlong_reward,
    laser_d_reward,
    laser_d_targets,
    lcpo_exact_reward,
    lcpo_max_reward,
    shorterbetter_reward,
)


def _call(fn, lengths, groups=None, **kwargs):
    n = len(lengths)
    return fn(["x"] * n, ["1"] * n, lengths, groups if groups is not None else [0] * n, **kwargs)


def test_dapo_overlong_is_zero_before_the_buffer_linear_in_it_and_minus_one_beyond() -> None:
    # free length 100 - 20 = 80: 90 is half way into the buffer
    assert _call(dapo_overlong_reward, [80, 90, 100, 101], max_len=100, buffer_len=20) == [0.0, -0.5, -1.0, -1.0]
    assert _call(dapo_overlong_reward, [90], max_len=100, buffer_len=20, penalty_factor=2.0) == [-1.0]
    with pytest.raises(ValueError, match="buffer_len"):
        _call(dapo_overlong_reward, [1], max_len=10, buffer_len=20)


def test_shorterbetter_targets_the_shortest_correct_or_the_mean_without_one() -> None:
    # group 0: SOL = 10 (shortest correct); group 1: nothing correct, SOL = mean(10, 30) = 20
    out = _call(shorterbetter_reward, [10, 30, 20, 10, 30], groups=[0, 0, 0, 1, 1],
                correct=[True, True, False, False, False], alpha=2.0, beta=0.01)
    assert out == pytest.approx([2.0, 2.0 - 0.2, -0.1, -0.1, -0.1])


def test_laser_d_targets_follow_each_difficulty() -> None:
    lengths = [15, 25, 35, 12, 30, 5, 8, 9, 10]
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ok = [True, True, True, True, False, False, False, False, False]
    # group 0 all right (easy): one correct completion per group within 20 -> target 20;
    # group 1 one in three (medium, not below 1/3): its correct 12 -> 20; group 2 (hard): none -> upper
    targets = laser_d_targets(lengths, ok, groups, lower=10, upper=40, interval=10, easy_accuracy=2 / 3,
                              hard_accuracy=1 / 3, coverage=1.0)
    assert targets == {0: 20, 1: 20, 2: 40}
    out = _call(laser_d_reward, lengths, groups=groups, correct=ok, alpha=0.5, lower=10, upper=40, interval=10)
    assert out == [1.5, 1.0, 1.0, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    # a coverage of two correct per group moves the easy target to 30
    assert laser_d_targets(lengths, ok, groups, lower=10, upper=40, interval=10, easy_accuracy=2 / 3,
                           hard_accuracy=1 / 3, coverage=2.0)[0] == 30


def test_lcpo_exact_and_max_hold_completions_to_the_prompt_budget() -> None:
    assert _call(lcpo_exact_reward, [40, 70], correct=[True, False], budgets=[50, 50],
                 alpha=0.01) == pytest.approx([0.9, -0.2])
    # clip(0.01 * (50 - L) + 0.5, 0, 1) for correct completions, 0 for wrong ones
    assert _call(lcpo_max_reward, [40, 100, 10, 10, -100], correct=[True, True, True, False, True],
                 budgets=[50] * 5, alpha=0.01, delta=0.5) == pytest.approx([0.6, 0.0, 0.9, 0.0, 1.0])
    with pytest.raises(ValueError, match="grpo.prompt_budget.budgets"):
        _call(lcpo_max_reward, [1], correct=[True])


def test_new_rewards_are_registered_with_checked_settings() -> None:
    total, per = compute_rewards([("shorterbetter", 1.0, {"beta": 0.5}), ("lcpo_exact", 2.0, {"alpha": 0.1})],
                                 ["a", "b"], ["1", "1"], [4, 6], [0, 0], correct=[True, False], budgets=[5, 5])
    # shorterbetter: SOL 4 -> (2, -1); lcpo_exact: (1 - 0.1, -0.1) x 2
    assert per["shorterbetter"].tolist() == pytest.approx([2.0, -1.0])
    assert total.tolist() == pytest.approx([2.0 + 1.8, -1.0 - 0.2])
    with pytest.raises(ValueError, match="takes no setting 'max_length'"):
        check_reward_kwargs("dapo_overlong", {"max_length": 10})
    with pytest.raises(ValueError, match="hard_accuracy"):
        check_reward_kwargs("laser_d", {"hard_accuracy": 0.9, "easy_accuracy": 0.5})
