"""Argument checks and group lookups shared by the reward functions (``functions``,
``length_methods``)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from fastmath_nemo.rewards.verify import verify_many


def _check(completions: Sequence, golds: Sequence, lengths: Sequence, group_ids: Sequence) -> None:
    n = len(completions)
    if not (len(golds) == len(lengths) == len(group_ids) == n):
        raise ValueError(
            f"length mismatch: completions={n} golds={len(golds)} lengths={len(lengths)} group_ids={len(group_ids)}"
        )


def _correct(completions: list[str], golds: list[str], correct: Sequence[bool] | None, timeout_s: float) -> list[bool]:
    if correct is None:
        return verify_many(completions, golds, timeout_s)
    if len(correct) != len(completions):
        raise ValueError(f"correct has {len(correct)} entries for {len(completions)} completions")
    return [bool(c) for c in correct]


def group_members(group_ids: Sequence[int]) -> dict[int, list[int]]:
    """``{group id: its rows}``, groups and rows in order of first appearance."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        members[g].append(i)
    return dict(members)
