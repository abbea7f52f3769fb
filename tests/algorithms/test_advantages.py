"""Hand-derived checks of the group-relative advantage estimators."""

from __future__ import annotations

import math

import pytest
import torch

from fastmath_nemo.algorithms.advantages import group_advantages

# Two groups of G = 4.
# Group 0: [1, 0, 1, 0]: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3,
#          std = 1/sqrt(3), A = +-0.5 * sqrt(3) = +-0.8660254.
# Group 1: [2, 0, 0, 0]: mean 0.5, deviations [1.5, -0.5, -0.5, -0.5],
#          unbiased var = (2.25 + 3 * 0.25) / 3 = 1, std = 1, A = deviations.
#          (A biased std, sqrt(0.75), would give 1.5 / 0.866 = 1.732 instead.)
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0])
H = 0.5 * math.sqrt(3.0)


def test_grpo_scales_by_unbiased_std() -> None:
    got = group_advantages(REWARDS, group_size=4)
    want = torch.tensor([H, -H, H, -H, 1.5, -0.5, -0.5, -0.5])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dr_grpo_only_centres() -> None:
    got = group_advantages(REWARDS, group_size=4, scale_by_std=False)
    want = torch.tensor([0.5, -0.5, 0.5, -0.5, 1.5, -0.5, -0.5, -0.5])
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)


def test_constant_group_gives_zeros_not_nan() -> None:
    got = group_advantages(torch.tensor([3.0, 3.0, 3.0, 1.0, 0.0, 2.0]), group_size=3)
    # Group 1: [1, 0, 2] mean 1, unbiased std 1 -> A = [0, -1, 1].
    want = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 1.0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.isfinite(got).all()


def test_group_of_one_gives_zeros() -> None:
    got = group_advantages(torch.tensor([1.0, 5.0]), group_size=1)
    torch.testing.assert_close(got, torch.zeros(2))


def test_integer_rewards_are_accepted() -> None:
    got = group_advantages(torch.tensor([1, 0]), group_size=2, scale_by_std=False)
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5]))


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(5), 2, "not divisible"),
        (torch.zeros(4), 0, "group_size"),
        (torch.zeros(2, 2), 2, "1-D"),
    ],
)
def test_bad_shapes_raise(rewards: torch.Tensor, group_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size)
