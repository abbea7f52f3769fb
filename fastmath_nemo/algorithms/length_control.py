"""What length-control methods do to a step's groups beyond their rewards (pure functions).

Rows are group-major: group g is rows ``g * G .. g * G + G - 1`` (``algorithms.advantages``).

- ``lift_correct_above_wrong``: grpo.correctness_first, the guarantee that no correct
  completion gets less total reward than a wrong one of its group.
- ``gfpo_keep``: GFPO's filter (Shrivastava et al. 2025, arXiv 2508.09726).
- ``groups_with_variance``: DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lift_correct_above_wrong(total: torch.Tensor, correct: Sequence[bool], group_size: int) -> tuple[torch.Tensor, int]:
    """Per group, where the lowest correct total reward is below the highest wrong one, every
    correct completion of the group gets ``max_wrong - min_correct`` more, so the lowest correct
    equals the highest wrong and the order among the correct ones (their length signal) stays.

    Why: summed rewards can rank a short wrong answer above a long correct one (the paper's
    format + cosine + Kimi length near the length limit; open-r1 #360). total: [N];
    returns (lifted [N], number of groups lifted)."""
    if total.dim() != 1 or total.shape[0] % group_size or len(correct) != total.shape[0]:
        raise ValueError(f"need [N] rewards and N correctness flags with N a multiple of {group_size}, got "
                         f"{tuple(total.shape)} and {len(correct)}")
    out = total.clone()
    lifted = 0
    ok = torch.tensor([bool(c) for c in correct]).view(-1, group_size)
    grouped = out.view(-1, group_size)  # a view: writes land in out
    for g in range(grouped.shape[0]):
        right, wrong = grouped[g][ok[g]], grouped[g][~ok[g]]
        if len(right) and len(wrong) and (gap := float(wrong.max() - right.min())) > 0:
            grouped[g][ok[g]] += gap
            lifted += 1
    return out, lifted


def gfpo_keep(lengths: Sequence[int], rewards: torch.Tensor, group_size: int, keep: int, metric: str) -> list[int]:
    """GFPO: the rows that train, ``keep`` per group of ``group_size`` sampled: the shortest
    (``metric="length"``) or those with the highest reward per token (``"reward_per_token"``,
    r_i / L_i); ties go to the earlier row. Their advantages are then computed over the kept
    rows alone, and the others get none (they leave the batch). Sorted row indices [P * keep]."""
    if not 1 <= keep <= group_size:
        raise ValueError(f"keep must be in [1, {group_size}], got {keep}")
    rows: list[int] = []
    for start in range(0, len(lengths), group_size):
        group = range(start, start + group_size)
        if metric == "length":
            score = {i: -float(lengths[i]) for i in group}
        elif metric == "reward_per_token":
            score = {i: float(rewards[i]) / max(int(lengths[i]), 1) for i in group}
        else:
            raise ValueError(f"metric must be 'length' or 'reward_per_token', got {metric!r}")
        rows += sorted(sorted(group, key=lambda i: (-score[i], i))[:keep])
    return rows


def groups_with_variance(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> list[bool]:
    """Dynamic sampling's test, per group: do its *total* rewards vary (max - min > eps)? A
    group where every completion is correct still varies when its lengths are rewarded
    differently, and keeps training; only a group with no signal at all is dropped."""
    grouped = rewards.view(-1, group_size)
    return [bool(g.max() - g.min() > eps) for g in grouped]
