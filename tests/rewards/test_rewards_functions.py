import math
import re

import pytest
import torch

from fastmath_nemo.rewards import functions as F
from fastmath_nemo.rewards.functions import (
    REWARD_FUNCTIONS,
    accuracy_reward,
    completion_lengths,
    compute_rewards,
    cosine_reward,
    format_reward,
    get_reward_fn,
    kimi_length_reward,
    repetition_penalty_reward,
)

# cos(pi/4) = 0.70710678...: 0.1 + 0.45 * 1.70710678 = 0.86819805
COS_7500 = 0.8681980515339464


def _call(fn, completions, lengths, golds=None, group_ids=None, **kw):
    n = len(completions)
    return fn(completions, golds or ["0"] * n, lengths, group_ids or [0] * n, **kw)


def test_completion_lengths():
    assert completion_lengths(["abc", "de"], unit="chars") == [3, 2]
    assert completion_lengths(["abc", "de"], [7, 9], unit="tokens") == [7, 9]
    with pytest.raises(ValueError):
        completion_lengths(["abc"], None, unit="tokens")
    with pytest.raises(ValueError):
        completion_lengths(["abc"], [1], unit="words")


def test_cosine_hand_values_tokens():
    lengths = [0, 7500, 15000, 30000, 45000]  # 45000 is clipped to max_len
    good = _call(cosine_reward, ["x"] * 5, lengths, correct=[True] * 5)
    bad = _call(cosine_reward, ["x"] * 5, lengths, correct=[False] * 5)
    assert good == pytest.approx([1.0, COS_7500, 0.55, 0.1, 0.1])
    assert bad == pytest.approx([-1.0, -COS_7500, -0.55, -0.1, -0.1])


def test_cosine_both_units_with_real_verification():
    # 14990 filler chars + "\boxed{42}" (10 chars) = 15000 chars.
    texts = ["a" * 14990 + r"\boxed{42}", "a" * 14990 + r"\boxed{41}"]
    assert completion_lengths(texts, unit="chars") == [15000, 15000]
    golds, groups = ["42", "42"], [0, 0]
    by_chars = cosine_reward(texts, golds, completion_lengths(texts, unit="chars"), groups)
    by_tokens = cosine_reward(texts, golds, completion_lengths(texts, [7500, 7500], unit="tokens"), groups)
    assert by_chars == pytest.approx([0.55, -0.55])
    assert by_tokens == pytest.approx([COS_7500, -COS_7500])


def test_cosine_custom_params():
    # max_len=100, len=50: cos(pi/2)=0 -> midpoint of [0, 2] = 1.0
    out = _call(cosine_reward, ["x"], [50], correct=[True], min_value_correct=0.0, max_value_correct=2.0, max_len=100)
    assert out == pytest.approx([1.0])


def test_kimi_length_groups():
    # group 7: lengths 100..500 (range 400) -> lam = 0.5, 0.25, 0.0, -0.5; group 3: equal lengths -> 0.
    lengths = [100, 50, 200, 300, 50, 500]
    groups = [7, 3, 7, 7, 3, 7]
    correct = [True, True, False, True, False, False]
    out = _call(kimi_length_reward, ["x"] * 6, lengths, group_ids=groups, correct=correct)
    assert out == pytest.approx([0.5, 0.0, 0.0, 0.0, 0.0, -0.5])


def test_kimi_length_chars():
    texts = ["x" * 10, "x" * 20, "x" * 30]  # lam = 0.5, 0.0, -0.5
    out = _call(kimi_length_reward, texts, completion_lengths(texts, unit="chars"), correct=[True, False, True])
    assert out == pytest.approx([0.5, 0.0, -0.5])


def test_repetition_penalty():
    # 9 words -> 7 trigrams, 3 unique: (1 - 3/7) * -1 = -4/7
    assert _call(repetition_penalty_reward, ["a b c a b c a b c"], [0]) == pytest.approx([-4 / 7])
    # lower-cased: a b c a b c -> 4 trigrams, 3 unique -> -0.25; no repeats -> 0; too short -> 0
    assert _call(repetition_penalty_reward, ["A b C a B c", "one two three four", "hi there", ""], [0] * 4) == (
        pytest.approx([-0.25, 0.0, 0.0, 0.0])
    )
    # bigrams of "x x x x": 3 total, 1 unique -> (2/3) * -0.5
    assert _call(repetition_penalty_reward, ["x x x x"], [0], ngram_size=2, max_penalty=-0.5) == pytest.approx([-1 / 3])
    with pytest.raises(ValueError):
        _call(repetition_penalty_reward, ["a"], [0], max_penalty=0.5)


def test_format_reward():
    texts = [
        r"<think>so \boxed{3}</think> The answer is 3.",  # box before </think>
        r"<think>thinking</think> \boxed{3}",  # box only after
        r"\boxed{3} but never closed",  # no </think>
        r"<think>\boxed{}</think>",  # empty box
        r"<think>\boxed{\frac{1}{2}} more</think>",
    ]
    assert _call(format_reward, texts, [0] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_accuracy_uses_given_correct_or_verifies():
    assert _call(accuracy_reward, ["a", "b"], [0, 0], correct=[True, False]) == [1.0, 0.0]
    assert accuracy_reward([r"\boxed{\frac{1}{2}}", r"\boxed{2}"], ["0.5", "3"], [0, 0], [0, 0]) == [1.0, 0.0]


def test_registry():
    assert set(REWARD_FUNCTIONS) == {"accuracy", "format", "cosine", "kimi_length", "repetition_penalty",
                                     "dapo_overlong", "shorterbetter", "laser_d", "lcpo_exact", "lcpo_max"}
    assert get_reward_fn("cosine") is cosine_reward
    with pytest.raises(ValueError, match="kimi_length"):
        get_reward_fn("nope")


def test_compute_rewards_verifies_once(monkeypatch):
    calls = []

    def fake_verify_many(completions, golds, timeout_s=2.0):
        calls.append(len(completions))
        return [True, False]

    monkeypatch.setattr(F, "verify_many", fake_verify_many)
    texts = [r"<think>\boxed{1}</think>", "<think>no</think>"]
    specs = [("accuracy", 1.0, {}), ("format", 0.5, {}), ("cosine", 2.0, {"max_len": 100}), ("kimi_length", 1.0, {})]
    total, parts = compute_rewards(specs, texts, ["1", "1"], [50, 100], [0, 0])
    assert calls == [2]
    # accuracy [1, 0]; format [1, 0]; cosine len 50/100 correct -> 0.55, len 100 wrong -> -0.1;
    # kimi: lam = [0.5, -0.5] -> [0.5, -0.5]
    assert parts["accuracy"].tolist() == [1.0, 0.0]
    assert parts["format"].tolist() == [1.0, 0.0]
    assert parts["cosine"].tolist() == pytest.approx([0.55, -0.1])
    assert parts["kimi_length"].tolist() == pytest.approx([0.5, -0.5])
    expected = [1.0 + 0.5 + 2 * 0.55 + 0.5, 0.0 + 0.0 + 2 * -0.1 - 0.5]
    assert total.dtype == torch.float32 and total.shape == (2,)
    assert total.tolist() == pytest.approx(expected)


def test_compute_rewards_skips_verification_when_unneeded(monkeypatch):
    monkeypatch.setattr(F, "verify_many", lambda *a, **k: pytest.fail("verification not needed"))
    total, parts = compute_rewards([("repetition_penalty", 1.0, {})], ["a b c a b c a b c"], ["0"], [9], [0])
    assert total.tolist() == pytest.approx([-4 / 7])
    assert math.isclose(parts["repetition_penalty"].item(), -4 / 7, rel_tol=1e-6)


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        format_reward(["a", "b"], ["0"], [1, 2], [0, 0])


# -- exceed-length penalty (Yeo et al. 2025) and checked settings ----------------------------
def test_cosine_exceed_length_penalty_replaces_truncated_rewards():
    texts, lengths = ["a", "b", "c"], [100, 400, 400]
    reasons = ["stop", "length", "length"]
    off = _call(cosine_reward, texts, lengths, correct=[True, True, False], max_len=400, finish_reasons=reasons)
    assert off == pytest.approx([0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.1, -0.1])  # off by default
    on = _call(cosine_reward, texts, lengths, correct=[True, True, False], max_len=400, finish_reasons=reasons,
               exceed_length_penalty=-10.0)
    assert on == pytest.approx([off[0], -10.0, -10.0])  # correct or not, a truncated completion gets r_exceed
    with pytest.raises(ValueError, match="needs finish_reasons"):
        _call(cosine_reward, texts, lengths, correct=[True] * 3, exceed_length_penalty=-10.0)


def test_compute_rewards_passes_finish_reasons():
    specs = [("cosine", 1.0, {"max_len": 100, "exceed_length_penalty": -5.0})]
    total, _ = compute_rewards(specs, ["a", "b"], ["1", "1"], [50, 100], [0, 0], correct=[True, False],
                               finish_reasons=["stop", "length"])
    assert total.tolist() == pytest.approx([0.55, -5.0])


@pytest.mark.parametrize(
    "name, kwargs, key, words",
    [
        ("cosine", {"max_length": 400}, "max_length", "valid: exceed_length_penalty (default None), max_len"),
        ("cosine", {"max_len": "400"}, "max_len", "must be int, got '400'"),
        ("cosine", {"max_len": 0}, "max_len", "must be > 0"),
        ("cosine", {"min_value_wrong": True}, "min_value_wrong", "must be float"),
        ("repetition_penalty", {"max_penalty": 1.0}, "max_penalty", "must be <= 0"),
        ("accuracy", {"timeout_s": 5}, "timeout_s", "valid: none"),
    ],
)
def test_bad_reward_settings_name_the_setting(name, kwargs, key, words):
    with pytest.raises(F.RewardSettingsError, match=re.escape(words)) as err:
        F.check_reward_kwargs(name, kwargs)
    assert err.value.key == key
    with pytest.raises(F.RewardSettingsError):  # also when called directly, not only at start-up
        compute_rewards([(name, 1.0, kwargs)], ["a"], ["1"], [1], [0], correct=[True])


def test_good_reward_settings_pass():
    F.check_reward_kwargs("cosine", {"max_len": 400, "min_value_wrong": -1, "exceed_length_penalty": -10})
    F.check_reward_kwargs("cosine", {"exceed_length_penalty": None})
    F.check_reward_kwargs("repetition_penalty", {"ngram_size": 4, "max_penalty": -0.5})
