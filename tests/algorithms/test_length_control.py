"""Group filters and the correctness guarantee, by hand."""

from __future__ import annotations

import pytest
import torch

from fastmath_nemo.algorithms.length_control import gfpo_keep, groups_with_variance, lift_correct_above_wrong


def test_lift_puts_the_lowest_correct_level_with_the_highest_wrong() -> None:
    total = torch.tensor([0.6, 0.9, 1.0, 0.2, 1.0, 0.0, 0.5, 0.3])
    correct = [True, False, True, False, True, False, True, False]
    lifted, groups = lift_correct_above_wrong(total, correct, 4)
    # group 0: gap 0.9 - 0.6 = 0.3 on both correct ones (their order kept); group 1 is in order
    assert lifted.tolist() == pytest.approx([0.9, 0.9, 1.3, 0.2, 1.0, 0.0, 0.5, 0.3])
    assert groups == 1
    assert total[0] == pytest.approx(0.6)  # the input is not changed
    with pytest.raises(ValueError, match="multiple of 4"):
        lift_correct_above_wrong(total[:6], correct[:6], 4)


def test_gfpo_keeps_the_shortest_or_the_best_reward_per_token() -> None:
    lengths = [5, 3, 9, 3, 4, 4, 2, 8]
    rewards = torch.tensor([1.0, 0.5, 2.0, 0.0, 0.0, 1.0, -1.0, 4.0])
    assert gfpo_keep(lengths, rewards, 4, 2, "length") == [1, 3, 4, 6]  # ties: the earlier row
    # per token: 0.2, 0.167, 0.222, 0 | 0, 0.25, -0.5, 0.5
    assert gfpo_keep(lengths, rewards, 4, 2, "reward_per_token") == [0, 2, 5, 7]
    with pytest.raises(ValueError, match="metric"):
        gfpo_keep(lengths, rewards, 4, 2, "tokens")


def test_dynamic_sampling_drops_only_groups_without_any_reward_spread() -> None:
    # all correct but rewarded by length (1.2, 1.0) is a signal; (1, 1) and (0, 0) are not
    rewards = torch.tensor([1.2, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    assert groups_with_variance(rewards, 2) == [True, False, False, True]
