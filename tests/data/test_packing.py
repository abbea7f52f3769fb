"""Tests for fastmath_nemo.data.packing (that packed documents do not attend to each other is
tests/batching/test_documents.py's)."""

from __future__ import annotations

import logging

import pytest
import torch

from fastmath_nemo.data.packing import (
    fit_to_length,
    pack_examples,
    packed_step_batches,
    plan_rows,
    rows_to_batch,
    unpacked_batch,
)

# The worked example of fastmath_nemo/batching/batch.py: doc 1 = 5 9 7 2 (prompt 5 9), doc 2 = 5 8 2
# (prompt 5), packed into one row of T = 8 with one pad.
DOC1 = ([5, 9, 7, 2], [0, 0, 1, 1])
DOC2 = ([5, 8, 2], [0, 1, 1])


def test_docstring_example() -> None:
    batch = pack_examples([DOC1, DOC2], max_len=8, pad_id=0, method="sequential", pad_to_max_len=True)
    assert batch.input_ids.tolist() == [[5, 9, 7, 2, 5, 8, 2, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert batch.document_ids.tolist() == [[1, 1, 1, 1, 2, 2, 2, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0, 1, 1, 0]]
    assert batch.input_ids.dtype == torch.long and batch.position_ids.dtype == torch.long
    assert batch.document_ids.dtype == torch.long and batch.loss_mask.dtype == torch.float32
    # FFD puts the longer document first; without pad_to_max_len the row is not padded.
    ffd = pack_examples([DOC2, DOC1], max_len=8, pad_id=0)
    assert ffd.input_ids.tolist() == [[5, 9, 7, 2, 5, 8, 2]]
    with pytest.raises(ValueError, match="shorter than the longest row"):
        rows_to_batch([DOC1, DOC2], [[0, 1]], pad_id=0, pad_to=6)


def test_first_token_of_each_document_is_never_a_target() -> None:
    batch = pack_examples([([1, 2], [1, 1]), ([3, 4, 5], [1, 1, 1])], max_len=5, pad_id=0)
    starts = batch.position_ids == 0
    assert (batch.loss_mask[starts] == 0).all()


def test_ffd_packs_tightly_and_keeps_every_example() -> None:
    lengths = [5, 4, 3, 3, 2, 2, 1]  # 20 tokens, fits in 2 rows of 10
    rows = plan_rows(lengths, 10, method="ffd")
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 2
    assert plan_rows(lengths, 10, method="sequential") == [[0, 1], [2, 3, 4, 5], [6]]


def test_packed_tokens_match_examples() -> None:
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(20):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        ids = torch.randint(1, 50, (n,), generator=gen).tolist()
        mask = torch.randint(0, 2, (n,), generator=gen).tolist()
        examples.append((ids, mask))
    batch = pack_examples(examples, max_len=16, pad_id=0)
    assert batch.input_ids.shape[1] <= 16
    seen = []
    for r in range(batch.num_rows):
        for d in range(1, int(batch.document_ids[r].max()) + 1):
            sel = batch.document_ids[r] == d
            assert batch.position_ids[r, sel].tolist() == list(range(int(sel.sum())))
            seen.append((batch.input_ids[r, sel].tolist(), batch.loss_mask[r, sel].long().tolist()))
    expected = [(ids, [0] + mask[1:]) for ids, mask in examples]
    assert sorted(seen) == sorted(expected)
    pad = batch.document_ids == 0
    assert (batch.input_ids[pad] == 0).all() and (batch.loss_mask[pad] == 0).all()


def test_truncation(caplog: pytest.LogCaptureFixture) -> None:
    examples = [([1, 2, 3, 4, 5], [0, 1, 1, 1, 1]), ([6, 7], [0, 1])]
    with caplog.at_level(logging.WARNING, logger="fastmath_nemo.data.packing"):
        batch = pack_examples(examples, max_len=3, pad_id=0)
    assert "truncated 1 of 2 examples" in caplog.text
    assert sorted(batch.input_ids.tolist()) == [[1, 2, 3], [6, 7, 0]]
    with pytest.raises(ValueError, match="example 0 has 5 tokens > max_len=3"):
        pack_examples(examples, max_len=3, pad_id=0, truncate=False)
    with pytest.raises(ValueError, match="mask has 1 entries for 2 tokens"):
        fit_to_length([([1, 2], [1])], 4)


def test_unpacked_batch() -> None:
    batch = unpacked_batch([DOC1, DOC2], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 9, 7, 2], [5, 8, 2, 0]]
    assert batch.document_ids.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]


def test_micro_batches_shuffle_per_epoch() -> None:
    examples = [([i + 1] * 4, [0, 1, 1, 1]) for i in range(10)]  # one example per row at max_len=6

    def order(epoch: int, seed: int = 1) -> list[int]:
        batches = list(packed_step_batches(examples, max_len=6, pad_id=0, rows_per_step=3, seed=seed, epoch=epoch))
        assert [b.num_rows for b in batches] == [3, 3, 3, 1]
        return [int(b.input_ids[r, 0]) for b in batches for r in range(b.num_rows)]

    assert sorted(order(0)) == list(range(1, 11))
    assert order(0) == order(0)  # reproducible
    assert order(0) != order(1)  # a new order each epoch
    assert order(0, seed=2) != order(0, seed=1)
    last = list(packed_step_batches(examples, max_len=6, pad_id=0, rows_per_step=3, drop_last=True))
    assert [b.num_rows for b in last] == [3, 3, 3]
