"""Tests for fastmath_nemo.algorithms.sft.step_batches on unpacked rows: random steps and
steps grouped by length."""

from __future__ import annotations

from collections import Counter

import pytest

from fastmath_nemo.batching.micro_batches import row_lengths
from fastmath_nemo.algorithms.sft import SFTData, step_batches
from fastmath_nemo.config.schema import SFTConfig

SHORT, LONG = 10, 50  # as traces without and with self-checks: the length follows a behaviour


@pytest.fixture(scope="module")
def data() -> SFTData:
    """96 examples, every other one long; token 0 of example i is i + 1, which names it."""
    examples = []
    for i in range(96):
        n = LONG if i % 2 else SHORT
        examples.append(([i + 1] + [500] * (n - 1), [0] + [1] * (n - 1)))
    return SFTData(examples, pad_id=0)


def _cfg(group_by_length: bool) -> SFTConfig:
    return SFTConfig(rows_per_step=8, packing=False, group_by_length=group_by_length)


def _names(batch) -> list[int]:
    return [int(i) - 1 for i in batch.input_ids[:, 0]]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_an_epoch_takes_every_example_once_in_steps_of_rows_per_step(data, group_by_length):
    batches = step_batches(data, _cfg(group_by_length), seed=3, epoch=0)
    assert [b.num_rows for b in batches] == [8] * 12
    assert sorted(i for b in batches for i in _names(b)) == list(range(96))
    for b in batches:  # each row is its own example, right-padded to the step's longest
        assert row_lengths(b) == [LONG if i % 2 else SHORT for i in _names(b)]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_steps_are_a_function_of_seed_and_epoch(data, group_by_length):
    cfg = _cfg(group_by_length)
    first = [_names(b) for b in step_batches(data, cfg, seed=3, epoch=0)]
    assert first == [_names(b) for b in step_batches(data, cfg, seed=3, epoch=0)]
    assert first != [_names(b) for b in step_batches(data, cfg, seed=3, epoch=1)]
    assert first != [_names(b) for b in step_batches(data, cfg, seed=4, epoch=0)]


def test_grouped_steps_hold_one_length_and_random_steps_mix_them(data):
    """Grouped: every step all short or all long (little padding, but a behaviour that sets the
    length is taught one way per step). Random: steps hold both, as the data does."""
    def kinds(group_by_length: bool) -> Counter:
        steps = step_batches(data, _cfg(group_by_length), seed=3, epoch=0)
        return Counter(len({i % 2 for i in _names(b)}) for b in steps)

    assert kinds(True) == Counter({1: 12})
    # A random step of 8 out of 48 short and 48 long is one-sided with probability ~0.7%.
    assert kinds(False)[2] >= 11
