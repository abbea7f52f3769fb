r"""Group-aware reward functions for GRPO.

Every reward has the signature::

    fn(completions: list[str], golds: list[str], lengths: list[int], group_ids: list[int],
       *, correct: list[bool] | None = None, **kwargs) -> list[float]      # all lists [N]

``lengths`` are in the caller's unit (see ``completion_lengths``); ``group_ids[i]`` is the
prompt of completion i. ``correct`` lets the caller verify once per step and share it;
when None, functions that need it call ``verify_many``. Unknown kwargs are ignored so one
kwargs dict can be passed to every reward.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from fastmath_nemo.rewards.extract import last_boxed_answer, think_section
from fastmath_nemo.rewards.verify import verify_many

__all__ = [
    "RewardFn",
    "completion_lengths",
    "accuracy_reward",
    "format_reward",
    "cosine_reward",
    "kimi_length_reward",
    "repetition_penalty_reward",
    "REWARD_FUNCTIONS",
    "get_reward_fn",
    "compute_rewards",
]

RewardFn = Callable[..., list[float]]


def completion_lengths(
    texts: Sequence[str],
    token_counts: Sequence[int] | None = None,
    unit: Literal["tokens", "chars"] = "tokens",
) -> list[int]:
    """Length of each completion: ``token_counts`` for ``"tokens"``, ``len(text)`` for ``"chars"``."""
    if unit == "chars":
        return [len(t) for t in texts]
    if unit == "tokens":
        if token_counts is None or len(token_counts) != len(texts):
            raise ValueError("unit='tokens' needs one token count per completion")
        return [int(n) for n in token_counts]
    raise ValueError(f"unit must be 'tokens' or 'chars', got {unit!r}")


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


def accuracy_reward(
    completions, golds, lengths, group_ids, *, correct=None, timeout_s: float = 2.0, **_
) -> list[float]:
    """r_i = 1 if completion i's last boxed answer matches its gold else 0."""
    _check(completions, golds, lengths, group_ids)
    return [float(c) for c in _correct(completions, golds, correct, timeout_s)]


def format_reward(completions, golds, lengths, group_ids, **_) -> list[float]:
    r"""r_i = 1 if the completion contains ``</think>`` and a non-empty ``\boxed{}`` before it, else 0."""
    _check(completions, golds, lengths, group_ids)
    out = []
    for text in completions:
        think = think_section(text)
        box = None if think is None else last_boxed_answer(think)
        out.append(1.0 if box is not None and box.strip() else 0.0)
    return out


def cosine_reward(
    completions,
    golds,
    lengths,
    group_ids,
    *,
    correct=None,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.1,
    min_value_correct: float = 0.1,
    max_value_correct: float = 1.0,
    max_len: int = 30000,
    timeout_s: float = 2.0,
    **_,
) -> list[float]:
    """Cosine length-scaled correctness (Demystifying Long CoT; open-r1 ``get_cosine_scaled_reward``).

    p = min(L / max_len, 1);  c = cos(pi * p)
    correct: lo, hi = min_value_correct, max_value_correct   (1.0 at L=0 -> 0.1 at L>=max_len)
    wrong:   lo, hi = max_value_wrong,   min_value_wrong     (-1.0 at L=0 -> -0.1 at L>=max_len;
             swapped so short wrong answers are punished most)
    r = lo + 0.5 * (hi - lo) * (1 + c)
    """
    _check(completions, golds, lengths, group_ids)
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    out = []
    for ok, length in zip(_correct(completions, golds, correct, timeout_s), lengths, strict=True):
        lo, hi = (min_value_correct, max_value_correct) if ok else (max_value_wrong, min_value_wrong)
        cosine = math.cos(math.pi * min(max(length, 0) / max_len, 1.0))
        out.append(lo + 0.5 * (hi - lo) * (1.0 + cosine))
    return out


def kimi_length_reward(
    completions, golds, lengths, group_ids, *, correct=None, timeout_s: float = 2.0, **_
) -> list[float]:
    """Kimi k1.5 relative length reward, per group g (the completions of one prompt).

    lam_i = 0.5 - (L_i - min_g L) / (max_g L - min_g L)   (in [-0.5, 0.5]; 0 if max_g L == min_g L)
    r_i = lam_i if correct_i else min(0, lam_i)
    """
    _check(completions, golds, lengths, group_ids)
    ok = _correct(completions, golds, correct, timeout_s)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        members[g].append(i)
    out = [0.0] * len(completions)
    for idx in members.values():
        lo, hi = min(lengths[i] for i in idx), max(lengths[i] for i in idx)
        if hi == lo:
            continue  # no length signal inside this group
        for i in idx:
            lam = 0.5 - (lengths[i] - lo) / (hi - lo)
            out[i] = lam if ok[i] else min(0.0, lam)
    return out


def repetition_penalty_reward(
    completions, golds, lengths, group_ids, *, ngram_size: int = 3, max_penalty: float = -1.0, **_
) -> list[float]:
    """N-gram repetition penalty (open-r1): words = lower(text).split(), n-grams of ``ngram_size``.

    r = (1 - #unique n-grams / #n-grams) * max_penalty;  0 if fewer than ``ngram_size`` words.
    """
    _check(completions, golds, lengths, group_ids)
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be >= 1, got {ngram_size}")
    out = []
    for text in completions:
        words = text.lower().split()
        if len(words) < ngram_size:
            out.append(0.0)
            continue
        ngrams = list(zip(*(words[k:] for k in range(ngram_size)), strict=False))  # ragged on purpose
        out.append((1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty)
    return out


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "cosine": cosine_reward,
    "kimi_length": kimi_length_reward,
    "repetition_penalty": repetition_penalty_reward,
}
# Rewards that consume `correct`; verification is skipped when none of them is requested.
_NEEDS_CORRECT = frozenset({"accuracy", "cosine", "kimi_length"})


def get_reward_fn(name: str) -> RewardFn:
    """Registry lookup; ValueError naming the valid rewards for an unknown name."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid: {sorted(REWARD_FUNCTIONS)}") from None


def compute_rewards(
    specs: Sequence[tuple[str, float, dict]],
    completions: list[str],
    golds: list[str],
    lengths: list[int],
    group_ids: list[int],
    *,
    correct: Sequence[bool] | None = None,
    timeout_s: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of rewards; verification runs at most once and is shared.

    specs: ``(name, weight, kwargs)`` triples. Returns ``total`` float32 [N] = sum_k w_k * r_k
    and ``{name: r_k}`` raw float32 [N] tensors (a repeated name gets a ``#j`` suffix).
    """
    _check(completions, golds, lengths, group_ids)
    fns = [(name, weight, kwargs, get_reward_fn(name)) for name, weight, kwargs in specs]
    if correct is None and any(name in _NEEDS_CORRECT for name, *_ in fns):
        correct = verify_many(completions, golds, timeout_s)
    total = torch.zeros(len(completions), dtype=torch.float32)
    per_reward: dict[str, torch.Tensor] = {}
    for j, (name, weight, kwargs, fn) in enumerate(fns):
        values = torch.tensor(
            fn(completions, golds, lengths, group_ids, **{"timeout_s": timeout_s, **kwargs, "correct": correct}),
            dtype=torch.float32,
        )
        per_reward[name if name not in per_reward else f"{name}#{j}"] = values
        total += weight * values
    return total, per_reward
