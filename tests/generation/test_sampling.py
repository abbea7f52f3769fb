"""Tests for fastmath_nemo.generation.sampling (top-p / min-p filtering, stop sequences)."""

from __future__ import annotations

import pytest
import torch

from fastmath_nemo.generation.sampling import ends_with_any, filter_top_p_min_p, sample_top_p_min_p

PROBS = [0.5, 0.3, 0.15, 0.05]


def _filter(probs, top_p=1.0, min_p=0.0, dtype=torch.float32):
    return filter_top_p_min_p(torch.tensor([probs], dtype=dtype), top_p, min_p)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_p_keeps_the_nucleus_and_renormalises(dtype):
    out = _filter(PROBS, top_p=0.8, dtype=dtype)
    torch.testing.assert_close(out, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=dtype))


def test_top_p_is_order_independent():
    perm = [2, 0, 3, 1]
    out = _filter([PROBS[i] for i in perm], top_p=0.8)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.625, 0.0, 0.375]))


def test_top_p_just_above_a_boundary_keeps_the_next_token():
    out = _filter(PROBS, top_p=0.81)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_tiny_top_p_keeps_the_top_token():
    torch.testing.assert_close(_filter(PROBS, top_p=0.01), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_min_p_drops_tokens_below_fraction_of_max():
    # threshold = 0.2 * 0.5 = 0.1: only 0.05 goes
    out = _filter(PROBS, min_p=0.2)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_min_p_and_top_p_together():
    torch.testing.assert_close(_filter(PROBS, top_p=0.8, min_p=0.2), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # min_p=0.4: threshold 0.2 drops 0.15 and 0.05
    torch.testing.assert_close(_filter(PROBS, min_p=0.4), torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_no_filtering_is_identity():
    torch.testing.assert_close(_filter(PROBS), torch.tensor(PROBS))


def test_rows_are_filtered_independently():
    probs = torch.tensor([PROBS, [0.05, 0.15, 0.3, 0.5], [0.7, 0.1, 0.1, 0.1]])
    out = filter_top_p_min_p(probs, 0.75, 0.0)  # away from the 0.8 boundaries
    expected = torch.tensor(
        [[0.625, 0.375, 0.0, 0.0], [0.0, 0.0, 0.375, 0.625], [0.7 / 0.8, 0.1 / 0.8, 0.0, 0.0]]
    )
    # row 3: mass before the 2nd token is 0.7 < 0.75 (kept), before the 3rd is 0.8 (dropped);
    # ties among the 0.1s are broken by sort order, so only check the mass and the top token
    torch.testing.assert_close(out[:2], expected[:2])
    assert out[2, 0].item() == pytest.approx(0.875)
    assert int((out[2] > 0).sum()) == 2
    torch.testing.assert_close(out.sum(-1), torch.ones(3))


@pytest.mark.parametrize(("top_p", "min_p", "want"), [(0.8, 0.0, [0.625, 0.375, 0.0, 0.0]), (1.0, 0.0, PROBS),
                                                       (1.0, 0.2, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])])
def test_sampling_draws_from_the_filtered_distribution(top_p, min_p, want):
    # 40,000 draws of a shuffled row: each frequency within 0.01 of the filtered probability
    # (4.3 standard errors at p = 0.5), and never a token outside the nucleus
    perm = [2, 0, 3, 1]
    probs = torch.tensor([[PROBS[i] for i in perm]]).expand(40_000, 4)
    tokens = sample_top_p_min_p(probs, top_p, min_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(freq, torch.tensor([want[i] for i in perm]), atol=0.01, rtol=0.0)
    assert all(freq[i] == 0 for i in range(4) if want[perm[i]] == 0.0)


def test_sampling_rows_that_keep_few_and_many_tokens_together():
    # The draw looks only at the K most likely tokens, K the most any row keeps under min-p:
    # a peaked row (keeps 3) beside a flat one (keeps all 8) must still draw from all 8.
    peaked = [0.5, 0.3, 0.15, 0.05, 0.0, 0.0, 0.0, 0.0]
    flat = [0.125] * 8
    probs = torch.tensor([peaked, flat]).repeat(20_000, 1)
    tokens = sample_top_p_min_p(probs, 1.0, 0.2, torch.Generator().manual_seed(0)).view(20_000, 2)
    for column, row in enumerate((peaked, flat)):
        freq = torch.bincount(tokens[:, column], minlength=8).float() / 20_000
        want = filter_top_p_min_p(torch.tensor([row]), 1.0, 0.2)[0]
        torch.testing.assert_close(freq, want, atol=0.015, rtol=0.0)
        assert all(freq[i] == 0 for i in range(8) if want[i] == 0.0)


@pytest.mark.parametrize(
    ("sequence", "stops", "expected"),
    [
        ([1, 2, 3], ((2, 3),), True),
        ([1, 2, 3], ((3,),), True),
        ([1, 2, 3], ((1, 2),), False),  # a match that is not at the end
        ([3], ((2, 3),), False),  # stop longer than the sequence
        ([2, 3], ((1, 2, 3),), False),
        ([], ((1,),), False),
        ([1, 2], (), False),
        ([5, 6, 7], ((9,), (6, 7)), True),  # any of several
        ([1, 2, 3], ((1, 2, 3),), True),  # the whole sequence
    ],
)
def test_ends_with_any(sequence, stops, expected):
    assert ends_with_any(sequence, stops) is expected
