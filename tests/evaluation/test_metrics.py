import math

import pytest

from fastmath_nemo.evaluation.metrics import SampleResult, majority_at_k, pass_at_k, summarize


def s(pid: int, answer: str | None, correct: bool, tokens: int = 10, truncated: bool = False):
    return SampleResult(
        problem_id=pid, answer=answer, correct=correct, num_tokens=tokens, truncated=truncated
    )


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2) = 0.7
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c < k: every pair holds a correct sample


def test_pass_at_k_matches_binomials_and_is_stable():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    value = pass_at_k(2048, 3, 512)  # C(2048, 512) overflows a float
    assert 0.0 < value < 1.0 and math.isfinite(value)


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_tie_goes_to_first_occurrence():
    samples = [s(0, "7", False), s(0, "8", True), s(0, "8", True), s(0, "7", False)]
    assert majority_at_k(samples, 2) is False  # 7 vs 8 tie -> "7" seen first
    assert majority_at_k(samples, 4) is False  # 2 vs 2 tie -> "7"
    assert majority_at_k(samples, 3) is True  # "8" has two votes
    flipped = [samples[1], samples[0]]
    assert majority_at_k(flipped, 2) is True  # tie -> "8" seen first


def test_majority_none_does_not_vote():
    samples = [s(0, None, False), s(0, None, False), s(0, "5", True)]
    assert majority_at_k(samples, 3) is True
    assert majority_at_k(samples, 2) is False  # no votes at all


def test_majority_only_looks_at_first_k_and_checks_input():
    samples = [s(0, "1", True), s(0, "2", False), s(0, "2", False)]
    assert majority_at_k(samples, 1) is True
    assert majority_at_k(samples, 3) is False
    with pytest.raises(ValueError):
        majority_at_k(samples, 4)
    with pytest.raises(ValueError):
        majority_at_k([s(0, "1", True), s(1, "1", True)], 2)


def _hand_set():
    p0 = [
        s(0, "3", True, 10),
        s(0, "3", True, 20),
        s(0, "5", False, 30),
        s(0, None, False, 40, truncated=True),
    ]
    p1 = [s(1, "7", False, 100), s(1, "8", True, 100), s(1, "8", True, 100), s(1, "9", False, 100)]
    # Interleave problems: grouping must not rely on contiguity.
    return [x for pair in zip(p0, p1) for x in pair]


def test_summarize_hand_set():
    out = summarize(_hand_set(), k_values=(1, 2, 4, 8))
    assert out["pass@1"] == pytest.approx(0.5)  # c = 2 of 4 for both problems
    assert out["pass@2"] == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert out["pass@4"] == pytest.approx(1.0)
    assert "pass@8" not in out and "maj@8" not in out  # k > n
    assert out["maj@1"] == pytest.approx(0.5)  # p0 "3" right, p1 "7" wrong
    assert out["maj@2"] == pytest.approx(0.5)  # p0 "3"; p1 tie 7/8 -> "7" wrong
    assert out["maj@4"] == pytest.approx(1.0)  # p0 "3"; p1 "8"
    assert out["mean_output_tokens"] == pytest.approx(62.5)  # (100 + 400) / 8
    assert out["truncated_share"] == pytest.approx(0.125)
    # sorted 10 20 30 40 100 100 100 100: median (40 + 100) / 2, 90th at index 6.3 -> 100
    assert (out["p50_output_tokens"], out["p90_output_tokens"]) == (70.0, 100.0)
    assert out["tokens_per_correct"] == pytest.approx(500 / 4)
    assert out["pass@1_ci95"] == [0.5, 0.5]  # both problems at 2 of 4: every resample's mean is 0.5
    assert out["n_problems"] == 2
    assert out["n_samples"] == 4


def test_summarize_unequal_n_raises():
    samples = [s(0, "1", True), s(0, "1", True), s(1, "2", False)]
    with pytest.raises(ValueError, match="unequal"):
        summarize(samples)


def test_summarize_empty_raises():
    with pytest.raises(ValueError):
        summarize([])


def _binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest k with P(Binomial(n, p) <= k) >= q."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if total >= q:
            return k
    return n


def test_pass_at_1_interval_matches_the_binomial_closed_form():
    """One sample per problem, 30 of 50 right: a resample's pass@1 is Binomial(50, 0.6) / 50,
    so the bootstrap's 2.5th and 97.5th percentiles are that distribution's quantiles, up to
    one problem (1/50) for the finite resamples and the interpolation."""
    samples = [s(i, "1", i < 30, 10) for i in range(50)]
    lo, hi = summarize(samples, (1,), bootstrap_resamples=20000, seed=3)["pass@1_ci95"]
    assert abs(lo - _binomial_quantile(50, 0.6, 0.025) / 50) <= 1 / 50 + 1e-9
    assert abs(hi - _binomial_quantile(50, 0.6, 0.975) / 50) <= 1 / 50 + 1e-9
    # about 0.6 -+ 1.96 sqrt(0.6 * 0.4 / 50) = [0.464, 0.736], and seeded: the same twice
    assert 0.44 <= lo <= 0.48 and 0.72 <= hi <= 0.76
    assert summarize(samples, (1,), bootstrap_resamples=20000, seed=3)["pass@1_ci95"] == [lo, hi]
    few = [summarize(samples, (1,), bootstrap_resamples=40, seed=seed)["pass@1_ci95"] for seed in range(5)]
    assert len({tuple(ci) for ci in few}) > 1  # the seed is the resampling's


def test_tokens_per_correct_is_none_without_a_correct_sample():
    assert summarize([s(0, "1", False, 10), s(1, "1", False, 30)], (1,))["tokens_per_correct"] is None
