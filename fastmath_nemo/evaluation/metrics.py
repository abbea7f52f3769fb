"""Pure evaluation metrics over graded samples: pass@k, maj@k, output length.

Token budgets are applied at generation time (``max_tokens``); these functions are
budget-agnostic and only see the samples a budget produced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_K_VALUES: tuple[int, ...] = (2, 4, 8, 16, 32, 64)


@dataclass
class SampleResult:
    """One graded completion.

    answer:     the extracted final answer (None when none could be extracted)
    correct:    whether the grader accepted ``answer``
    num_tokens: generated tokens, stop token included
    truncated:  True when generation hit the token budget (finish reason "length")
    """

    problem_id: int
    answer: str | None
    correct: bool
    num_tokens: int
    truncated: bool


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021).

    ``1 - C(n-c, k) / C(n, k)``, evaluated as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` because the
    binomials overflow floats for realistic n (e.g. C(1024, 512)).
    """
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        # Every draw of k samples contains at least one correct one.
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_at_k(samples: Sequence[SampleResult], k: int) -> bool:
    """Majority vote over the first ``k`` samples of ONE problem.

    Samples without an extracted answer do not vote; ties go to the answer seen first.
    The vote is correct when every sample carrying the voted answer is correct (they share
    the answer string, so a grader normally agrees with itself). No votes at all -> False.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(samples) < k:
        raise ValueError(f"maj@{k} needs at least {k} samples, got {len(samples)}")
    if len({s.problem_id for s in samples}) > 1:
        raise ValueError("majority_at_k expects the samples of a single problem")
    first_k = samples[:k]
    votes = Counter(s.answer for s in first_k if s.answer is not None)
    if not votes:
        return False
    # Counter keeps insertion order and max() returns the first maximal item, which is
    # exactly "ties broken by first occurrence".
    winner = max(votes, key=votes.__getitem__)
    return all(s.correct for s in first_k if s.answer == winner)


def _group_by_problem(samples: Iterable[SampleResult]) -> dict[int, list[SampleResult]]:
    """Samples per problem, in order of first appearance; sample order is kept."""
    groups: dict[int, list[SampleResult]] = {}
    for s in samples:
        groups.setdefault(s.problem_id, []).append(s)
    return groups


def bootstrap_ci95(per_problem: Sequence[float], resamples: int, seed: int) -> list[float]:
    """95% percentile bootstrap interval of the mean of ``per_problem`` (one pass@1 per
    problem): ``resamples`` draws of as many problems with replacement (numpy's PCG64 seeded by
    ``seed``), and the 2.5th and 97.5th percentiles of their means (linear interpolation).
    Problems, not samples, are resampled: a problem's samples are not independent draws of
    the benchmark. Returns [lo, hi]."""
    values = np.asarray(per_problem, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def summarize(
    samples: Sequence[SampleResult], k_values: Iterable[int] = DEFAULT_K_VALUES, *,
    bootstrap_resamples: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Aggregate graded samples of one (model, token budget) evaluation.

    Keys: ``pass@1`` (mean over problems of c/n, i.e. pass@1 averaged over the n samples),
    ``pass@1_ci95`` ([lo, hi], :func:`bootstrap_ci95` over problems), ``pass@k`` and ``maj@k``
    for every k in ``k_values`` with k <= n (``pass@1`` is never overwritten),
    ``mean_output_tokens``, ``p50_output_tokens`` and ``p90_output_tokens`` (over all samples),
    ``tokens_per_correct`` (all samples' tokens / correct samples; None without one),
    ``truncated_share`` (share of samples that hit the budget), ``n_problems`` and
    ``n_samples`` (samples per problem).

    Raises ValueError when there are no samples or problems have different sample counts
    (unequal n would silently weight problems differently in pass@k).
    """
    if not samples:
        raise ValueError("summarize() needs at least one sample")
    ks = sorted(set(k_values))
    if any(k < 1 for k in ks):
        raise ValueError(f"k values must be >= 1, got {ks}")
    groups = _group_by_problem(samples)
    counts = {len(g) for g in groups.values()}
    if len(counts) != 1:
        raise ValueError(f"problems have unequal numbers of samples: {sorted(counts)}")
    n = counts.pop()
    n_problems = len(groups)
    correct_counts = [sum(s.correct for s in g) for g in groups.values()]

    result: dict[str, Any] = {"pass@1": sum(c / n for c in correct_counts) / n_problems,
                              "pass@1_ci95": bootstrap_ci95([c / n for c in correct_counts], bootstrap_resamples, seed)}
    usable = [k for k in ks if k <= n]
    for k in usable:
        if k != 1:
            result[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct_counts) / n_problems
    for k in usable:
        result[f"maj@{k}"] = sum(majority_at_k(g, k) for g in groups.values()) / n_problems
    tokens = np.asarray([s.num_tokens for s in samples], dtype=np.float64)
    result["mean_output_tokens"] = float(tokens.mean())
    result["p50_output_tokens"], result["p90_output_tokens"] = (float(q) for q in np.percentile(tokens, [50, 90]))
    n_correct = sum(correct_counts)
    result["tokens_per_correct"] = float(tokens.sum()) / n_correct if n_correct else None
    result["truncated_share"] = sum(s.truncated for s in samples) / len(samples)
    result["n_problems"] = n_problems
    result["n_samples"] = n
    return result
