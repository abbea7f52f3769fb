r"""Group-aware reward functions for GRPO.

Every reward has the signature::

    fn(completions: list[str], golds: list[str], lengths: list[int], group_ids: list[int],
       *, correct: list[bool] | None = None, finish_reasons: list[str] | None = None,
       budgets: list[int] | None = None, timeout_s: float = 2.0, <its settings>, **_)
       -> list[float]                                                   # all lists [N]

``lengths`` are in the caller's unit (see ``completion_lengths``); ``group_ids[i]`` is the
prompt of completion i. ``correct`` lets the caller verify once per step and share it;
when None, functions that need it call ``verify_many``. ``finish_reasons[i]`` is "stop" or
"length" (hit the token limit); ``budgets[i]`` the token budget in its prompt (L1).
The other length-control methods' rewards are in ``length_methods``. ``**_`` takes the shared arguments a reward does not use;
its settings (a config's ``kwargs``) are checked by name and type by ``check_reward_kwargs``.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch

from fastmath_nemo.config.schema import LengthUnit
from fastmath_nemo.rewards import length_methods
from fastmath_nemo.rewards._groups import _check, _correct, group_members
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
    "reward_settings",
    "check_reward_kwargs",
    "RewardSettingsError",
    "compute_rewards",
]

RewardFn = Callable[..., list[float]]


def completion_lengths(
    texts: Sequence[str],
    token_counts: Sequence[int] | None = None,
    unit: LengthUnit = LengthUnit.tokens,
) -> list[int]:
    """Length of each completion: ``token_counts`` for ``"tokens"``, ``len(text)`` for ``"chars"``."""
    if unit == "chars":
        return [len(t) for t in texts]
    if unit == "tokens":
        if token_counts is None or len(token_counts) != len(texts):
            raise ValueError("unit='tokens' needs one token count per completion")
        return [int(n) for n in token_counts]
    raise ValueError(f"unit must be 'tokens' or 'chars', got {unit!r}")


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
    exceed_length_penalty: float | None = None,
    finish_reasons: Sequence[str] | None = None,
    timeout_s: float = 2.0,
    **_,
) -> list[float]:
    """Cosine length-scaled correctness (Demystifying Long CoT; open-r1 ``get_cosine_scaled_reward``).

    p = min(L / max_len, 1);  c = cos(pi * p)
    correct: lo, hi = min_value_correct, max_value_correct   (1.0 at L=0 -> 0.1 at L>=max_len)
    wrong:   lo, hi = max_value_wrong,   min_value_wrong     (-1.0 at L=0 -> -0.1 at L>=max_len;
             swapped so short wrong answers are punished most)
    r = lo + 0.5 * (hi - lo) * (1 + c)

    ``exceed_length_penalty`` (Yeo et al. 2025, r_exceed; -10 in their runs; off by default):
    a completion cut by the token limit (``finish_reasons[i] == "length"``) gets this reward
    instead, correct or not, so truncation is never a cheaper outcome than a wrong answer.
    """
    _check(completions, golds, lengths, group_ids)
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    truncated = [False] * len(completions)
    if exceed_length_penalty is not None:
        if finish_reasons is None:
            raise ValueError("exceed_length_penalty needs finish_reasons (which completions hit the token limit)")
        if len(finish_reasons) != len(completions):
            raise ValueError(f"finish_reasons has {len(finish_reasons)} entries for {len(completions)} completions")
        truncated = [reason == "length" for reason in finish_reasons]
    out = []
    for ok, length, cut in zip(_correct(completions, golds, correct, timeout_s), lengths, truncated, strict=True):
        if cut:
            out.append(float(exceed_length_penalty))  # type: ignore[arg-type]  # not None when cut
            continue
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
    out = [0.0] * len(completions)
    for idx in group_members(group_ids).values():
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
    "dapo_overlong": length_methods.dapo_overlong_reward,
    "shorterbetter": length_methods.shorterbetter_reward,
    "laser_d": length_methods.laser_d_reward,
    "lcpo_exact": length_methods.lcpo_exact_reward,
    "lcpo_max": length_methods.lcpo_max_reward,
}


def get_reward_fn(name: str) -> RewardFn:
    """Registry lookup; ValueError naming the valid rewards for an unknown name."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid: {sorted(REWARD_FUNCTIONS)}") from None


# Keyword arguments every reward receives from the caller; not settings of a config's kwargs.
_SHARED_ARGUMENTS = frozenset({"correct", "finish_reasons", "budgets", "timeout_s"})


class RewardSettingsError(ValueError):
    """A reward's ``kwargs`` that its function cannot take; ``key`` names the kwarg when one is to blame."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@lru_cache(maxsize=None)
def reward_settings(name: str) -> dict[str, tuple[Any, Any]]:
    """The settings a reward takes in ``kwargs``: ``{parameter: (type hint, default)}``."""
    fn = get_reward_fn(name)
    hints = typing.get_type_hints(fn)
    return {
        p.name: (hints.get(p.name, Any), p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _SHARED_ARGUMENTS
    }


def _type_ok(value: Any, hint: Any) -> bool:
    """``value`` fits ``hint`` (int, float, str, X | None): YAML gives no other setting types.
    An int is a float here (``max_value_wrong: -1``); a bool is never a number."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    for option in options:
        if option is Any or (option is type(None) and value is None):
            return True
        if option in (int, float) and isinstance(value, bool):
            continue
        if option is float and isinstance(value, (int, float)):
            return True
        if isinstance(option, type) and isinstance(value, option):
            return True
    return False


def check_reward_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """RewardSettingsError for a kwarg the reward does not take (a typo such as ``max_length``
    for ``max_len``), a value of the wrong type, or one the reward rejects (checked by calling
    it on zero completions)."""
    settings = reward_settings(name)
    valid = ", ".join(f"{k} (default {default!r})" for k, (_hint, default) in sorted(settings.items())) or "none"
    for key, value in kwargs.items():
        if key not in settings:
            raise RewardSettingsError(f"reward {name!r} takes no setting {key!r}; valid: {valid}", key)
        hint, _default = settings[key]
        if not _type_ok(value, hint):
            raise RewardSettingsError(f"reward {name!r}: {key} must be {_hint_name(hint)}, got {value!r}", key)
    try:
        get_reward_fn(name)([], [], [], [], correct=[], finish_reasons=[], budgets=[], **kwargs)
    except (TypeError, ValueError) as e:
        raise RewardSettingsError(f"reward {name!r}: {e}", next((k for k in kwargs if k in str(e)), None)) from None


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("NoneType", "None")


def compute_rewards(
    specs: Sequence[tuple[str, float, dict]],
    completions: list[str],
    golds: list[str],
    lengths: list[int],
    group_ids: list[int],
    *,
    correct: Sequence[bool] | None = None,
    finish_reasons: Sequence[str] | None = None,
    budgets: Sequence[int] | None = None,
    timeout_s: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of rewards; verification runs at most once and is shared.

    specs: ``(name, weight, kwargs)`` triples, kwargs checked by ``check_reward_kwargs``.
    finish_reasons: [N] "stop" / "length", for rewards that treat truncation apart (cosine's
    ``exceed_length_penalty``). budgets: [N] the token budget in each completion's prompt
    (L1 / LCPO rewards), None without. Returns ``total`` float32 [N] = sum_k w_k * r_k and
    ``{name: r_k}`` raw float32 [N] tensors (a repeated name gets a ``#j`` suffix).
    """
    _check(completions, golds, lengths, group_ids)
    fns = [(name, weight, kwargs, get_reward_fn(name)) for name, weight, kwargs in specs]
    for name, _weight, kwargs, _fn in fns:
        check_reward_kwargs(name, kwargs)
    # verify only where a reward reads the verdicts (takes ``correct``)
    if correct is None and any("correct" in inspect.signature(fn).parameters for *_, fn in fns):
        correct = verify_many(completions, golds, timeout_s)
    shared = {"correct": correct, "finish_reasons": finish_reasons, "budgets": budgets, "timeout_s": timeout_s}
    total = torch.zeros(len(completions), dtype=torch.float32)
    per_reward: dict[str, torch.Tensor] = {}
    for j, (name, weight, kwargs, fn) in enumerate(fns):
        values = torch.tensor(fn(completions, golds, lengths, group_ids, **kwargs, **shared), dtype=torch.float32)
        per_reward[name if name not in per_reward else f"{name}#{j}"] = values
        total += weight * values
    return total, per_reward
