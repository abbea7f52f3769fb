"""The micro-batch planner (token budget, row count) and order restoration."""

from __future__ import annotations

import random

import pytest
import torch
from _batches import batch_of_lengths as _batch

from fastmath_nemo.batching.micro_batches import MicroBatching, merge_rows, plan_micro_batches, row_lengths, split_batch
from fastmath_nemo.config.schema import PolicyConfig


def test_token_budget_is_respected_and_every_row_is_used_once() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(1, 200)
        groups = plan_micro_batches(lengths, MicroBatching(rows=4, max_tokens=budget))
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            width = max(lengths[i] for i in g)
            assert len(g) * width <= budget or len(g) == 1  # a row over the budget goes alone
            assert lengths[g[0]] == width  # longest first: the first row sets the width


def test_token_budget_packs_short_rows_together() -> None:
    # sorted longest first: 9 (alone: 2 x 9 > 16), then 5, 4, 3 (3 x 5 = 15 <= 16), then 2, 1
    groups = plan_micro_batches([3, 9, 1, 5, 4, 2], MicroBatching(max_tokens=16))
    assert groups == [[1], [3, 4, 0], [5, 2]]
    # a row longer than the budget is a micro-batch of its own
    assert plan_micro_batches([40, 3, 3], MicroBatching(max_tokens=10)) == [[0], [1, 2]]


def test_row_count_split_keeps_the_order() -> None:
    assert plan_micro_batches([5] * 7, MicroBatching(rows=3)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_micro_batches_are_trimmed_to_their_own_longest_row() -> None:
    batch = _batch([12, 3, 7, 4, 11])
    assert row_lengths(batch) == [12, 3, 7, 4, 11]
    micro, groups = split_batch(batch, MicroBatching(max_tokens=24))
    assert groups == [[0, 4], [2, 3, 1]]
    assert [(m.num_rows, m.width) for m in micro] == [(2, 12), (3, 7)]
    for m, g in zip(micro, groups):  # the rows themselves, not only their shapes
        assert torch.equal(m.input_ids, batch.input_ids[g, : m.width])
        assert torch.equal(m.loss_mask, batch.loss_mask[g, : m.width])
        assert batch.loss_mask[g, m.width :].sum() == 0  # nothing trimmed was a target


def test_merge_rows_restores_the_original_order() -> None:
    batch = _batch([6, 2, 9, 5, 1, 8])
    micro, groups = split_batch(batch, MicroBatching(max_tokens=12))
    # a backend may hand back padded results: one extra row and two extra columns
    parts = [torch.nn.functional.pad(m.input_ids.float(), (0, 2, 0, 1), value=-1.0) for m in micro]
    merged = merge_rows(parts, micro, groups, batch.num_rows, batch.width)
    assert torch.equal(merged, batch.input_ids.float())


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="rows"):
        MicroBatching(rows=0)
    with pytest.raises(ValueError, match="max_tokens"):
        MicroBatching(max_tokens=0)


def test_the_run_split_comes_from_the_policy_keys() -> None:
    cfg = PolicyConfig(micro_batch_rows=3, max_tokens_per_micro_batch=40)
    assert MicroBatching.of(cfg) == MicroBatching(rows=3, max_tokens=40)
    assert MicroBatching.of(PolicyConfig(micro_batch_rows=5)) == MicroBatching(rows=5, max_tokens=None)
