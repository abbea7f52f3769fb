r"""Length rewards of the field's other length-control methods, with their papers' defaults.

Same signature as every reward (``rewards.functions``); the group-aware ones read
``group_ids``. ``budgets[i]`` is the token budget written into completion i's prompt (L1 /
LCPO, ``grpo.prompt_budget``), None when prompts carry none. What a method does beyond its
reward (DAPO's overlong filtering and dynamic sampling, GFPO's filtering) lives in
``algorithms.length_control``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastmath_nemo.rewards._groups import _check, _correct, group_members


def dapo_overlong_reward(
    completions, golds, lengths, group_ids, *, max_len: int = 20480, buffer_len: int = 4096,
    penalty_factor: float = 1.0, **_,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13; 20,480 and
    4,096 in its runs), a penalty in a buffer before the length limit::

        r = 0                                          L <= max_len - buffer_len
        r = (max_len - buffer_len - L) / buffer_len    max_len - buffer_len < L <= max_len
        r = -1                                         L > max_len
    times ``penalty_factor``. Added to a correctness reward; correctness-blind by design.
    """
    _check(completions, golds, lengths, group_ids)
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}")
    free = max_len - buffer_len
    out = []
    for length in lengths:
        r = 0.0 if length <= free else (free - length) / buffer_len if length <= max_len else -1.0
        out.append(penalty_factor * r)
    return out


def shorterbetter_reward(
    completions, golds, lengths, group_ids, *, correct=None, alpha: float = 2.0, beta: float = 0.001,
    timeout_s: float = 2.0, **_,
) -> list[float]:
    """ShorterBetter (Yi, Wang, Li 2025, arXiv 2504.21370): the sample-optimal length (SOL) of a
    group is its shortest correct completion, or its mean length when none is correct::

        r_i = alpha * correct_i - beta * |L_i - SOL_g|        (alpha 2.0, beta 0.001)
    """
    _check(completions, golds, lengths, group_ids)
    ok = _correct(completions, golds, correct, timeout_s)
    out = [0.0] * len(completions)
    for rows in group_members(group_ids).values():
        right = [lengths[i] for i in rows if ok[i]]
        sol = min(right) if right else sum(lengths[i] for i in rows) / len(rows)
        for i in rows:
            out[i] = alpha * float(ok[i]) - beta * abs(lengths[i] - sol)
    return out


def laser_d_targets(
    lengths: Sequence[int], ok: Sequence[bool], group_ids: Sequence[int], *, lower: int, upper: int, interval: int,
    easy_accuracy: float, hard_accuracy: float, coverage: float,
) -> dict[int, int]:
    """LASER-D's target length per group: its difficulty from its accuracy (easy at or above
    ``easy_accuracy``, hard below ``hard_accuracy``, else medium), and per difficulty the
    shortest candidate L in ``lower, lower + interval, ..., upper`` whose expected correct
    responses ECR(L) = (correct completions of that difficulty no longer than L) / (its groups)
    reach ``coverage``; ``upper`` where none does."""
    buckets: dict[str, list[list[int]]] = {"easy": [], "medium": [], "hard": []}
    level: dict[int, str] = {}
    for g, rows in group_members(group_ids).items():
        accuracy = sum(ok[i] for i in rows) / len(rows)
        level[g] = "easy" if accuracy >= easy_accuracy else "hard" if accuracy < hard_accuracy else "medium"
        buckets[level[g]].append(rows)
    candidates = list(range(lower, upper, interval)) + [upper]
    target: dict[str, int] = {}
    for name, groups in buckets.items():
        right = [lengths[i] for rows in groups for i in rows if ok[i]]
        target[name] = next((c for c in candidates if groups and sum(n <= c for n in right) / len(groups) >= coverage),
                            upper)
    return {g: target[level[g]] for g in level}


def laser_d_reward(
    completions, golds, lengths, group_ids, *, correct=None, alpha: float = 0.5, lower: int = 4096,
    upper: int = 16384, interval: int = 1024, easy_accuracy: float = 2 / 3, hard_accuracy: float = 1 / 3,
    coverage: float = 1.0, timeout_s: float = 2.0, **_,
) -> list[float]:
    """LASER-D (Liu et al. 2025, arXiv 2505.15612): a step reward for correct completions within
    a target length that adapts to the problem's difficulty (``laser_d_targets``)::

        r_i = correct_i + alpha * correct_i * [L_i <= L_A(difficulty of group i)]

    Defaults: the reference's 1.5B script (length_reward_scalar 0.5, targets 4,096..16,384 in
    steps of 1,024). Departure: the reference measures ECR on a 500-problem monitor set every
    20 steps; here it is measured on the rows this reward scores (the step's groups), so no
    extra generation is needed. The difficulty cut points are settings (two thirds, one third).
    """
    _check(completions, golds, lengths, group_ids)
    if not (0 < lower <= upper and interval > 0):
        raise ValueError(f"need 0 < lower <= upper and interval > 0, got {lower}, {upper}, {interval}")
    if not 0.0 <= hard_accuracy <= easy_accuracy <= 1.0:
        raise ValueError(f"need 0 <= hard_accuracy <= easy_accuracy <= 1, got {hard_accuracy}, {easy_accuracy}")
    ok = _correct(completions, golds, correct, timeout_s)
    targets = laser_d_targets(lengths, ok, group_ids, lower=lower, upper=upper, interval=interval,
                              easy_accuracy=easy_accuracy, hard_accuracy=hard_accuracy, coverage=coverage)
    return [float(c) * (1.0 + alpha * float(n <= targets[g])) for c, n, g in zip(ok, lengths, group_ids)]


def _budgets(budgets: Sequence[int] | None, n: int, name: str) -> list[int]:
    if budgets is None:
        raise ValueError(f"{name} needs a token budget in every prompt: set grpo.prompt_budget.budgets")
    if len(budgets) != n:
        raise ValueError(f"budgets has {len(budgets)} entries for {n} completions")
    return [int(b) for b in budgets]


def lcpo_exact_reward(
    completions, golds, lengths, group_ids, *, correct=None, budgets=None, alpha: float = 0.0003,
    timeout_s: float = 2.0, **_,
) -> list[float]:
    """L1's LCPO-Exact (Aggarwal & Welleck 2025, arXiv 2503.04697): meet the prompt's budget
    n_gold exactly::

        r_i = correct_i - alpha * |n_gold_i - L_i|        (alpha 0.0003)
    """
    _check(completions, golds, lengths, group_ids)
    ok = _correct(completions, golds, correct, timeout_s)
    gold = _budgets(budgets, len(completions), "lcpo_exact")
    return [float(c) - alpha * abs(b - n) for c, b, n in zip(ok, gold, lengths)]


def lcpo_max_reward(
    completions, golds, lengths, group_ids, *, correct=None, budgets=None, alpha: float = 0.0003,
    delta: float = 0.5, timeout_s: float = 2.0, **_,
) -> list[float]:
    """L1's LCPO-Max: the prompt's budget n_gold as an upper bound, softly::

        r_i = correct_i * clip(alpha * (n_gold_i - L_i) + delta, 0, 1)     (alpha 0.0003, delta 0.5)
    """
    _check(completions, golds, lengths, group_ids)
    ok = _correct(completions, golds, correct, timeout_s)
    gold = _budgets(budgets, len(completions), "lcpo_max")
    return [float(c) * min(max(alpha * (b - n) + delta, 0.0), 1.0) for c, b, n in zip(ok, gold, lengths)]
