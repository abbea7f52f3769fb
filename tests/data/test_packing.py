"""Tests for fastmath_nemo.data.packing, including the proof that packed documents do not
attend to each other in a real transformers model."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastmath_nemo.data.packing import (
    document_attention_mask,
    fit_to_length,
    pack_examples,
    packed_micro_batches,
    plan_rows,
    rows_to_batch,
    unpacked_batch,
)

# The worked example of fastmath_nemo/batch.py: doc 1 = 5 9 7 2 (prompt 5 9), doc 2 = 5 8 2
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
        batches = list(packed_micro_batches(examples, max_len=6, pad_id=0, rows_per_batch=3, seed=seed, epoch=epoch))
        assert [b.num_rows for b in batches] == [3, 3, 3, 1]
        return [int(b.input_ids[r, 0]) for b in batches for r in range(b.num_rows)]

    assert sorted(order(0)) == list(range(1, 11))
    assert order(0) == order(0)  # reproducible
    assert order(0) != order(1)  # a new order each epoch
    assert order(0, seed=2) != order(0, seed=1)
    last = list(packed_micro_batches(examples, max_len=6, pad_id=0, rows_per_batch=3, drop_last=True))
    assert [b.num_rows for b in last] == [3, 3, 3]


def test_document_attention_mask_values() -> None:
    doc = torch.tensor([[1, 1, 2, 2, 0]])
    mask = document_attention_mask(doc)
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding attends to itself only
    ]
    assert mask[0, 0].long().tolist() == expected
    additive = document_attention_mask(doc, dtype=torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert (additive[mask] == 0).all()
    assert (additive[~mask] == torch.finfo(torch.bfloat16).min).all()


def tiny_qwen2(attn_implementation: str) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


LENGTHS = [7, 5, 4, 9, 3, 6]  # packs into rows of 16 with some padding


def packed_docs() -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(1, 64, (n,), generator=gen).tolist(), [1] * n) for n in LENGTHS]


@pytest.mark.parametrize(
    ("attn_implementation", "mask_dtype"),
    [("sdpa", None), ("sdpa", torch.float32), ("eager", torch.float32)],
)
def test_packed_logits_equal_per_document_logits(attn_implementation: str, mask_dtype: torch.dtype | None) -> None:
    """The proof that packing does not attend across documents: every packed document gets the
    same logits as when run alone."""
    model = tiny_qwen2(attn_implementation)
    docs = packed_docs()
    batch = pack_examples(docs, max_len=16, pad_id=0)
    assert batch.num_rows < len(docs) and (batch.document_ids.max(dim=1).values > 1).any()  # really packed
    assert (batch.document_ids == 0).any()  # and padded
    mask = document_attention_mask(batch.document_ids, dtype=mask_dtype)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask).logits
        assert torch.isfinite(packed).all()  # padding rows of the mask are not all-False
        checked = 0
        for r in range(batch.num_rows):
            for d in range(1, int(batch.document_ids[r].max()) + 1):
                sel = batch.document_ids[r] == d
                alone = model(input_ids=batch.input_ids[r, sel][None]).logits[0]
                torch.testing.assert_close(packed[r, sel], alone, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked == len(docs)


def test_eager_with_bool_mask_would_leak() -> None:
    """Why the additive form exists: eager adds the mask to the scores, so a bool mask
    (True -> +1, False -> +0) lets documents see each other."""
    model = tiny_qwen2("eager")
    batch = pack_examples(packed_docs(), max_len=16, pad_id=0)
    with torch.no_grad():
        leaky = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=document_attention_mask(batch.document_ids),
        ).logits
        right = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=document_attention_mask(batch.document_ids, dtype=torch.float32),
        ).logits
    assert not torch.allclose(leaky, right, atol=1e-3)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packing_from_position_ids_alone_needs_use_cache_false(attn_implementation: str) -> None:
    """The path for kernels that take no dense mask (flash / flex attention): with
    ``attention_mask=None`` transformers 5 derives the documents from restarting position_ids,
    but only without a KV cache. With the default ``use_cache=True`` (even in train mode) it
    silently attends across documents."""
    model = tiny_qwen2(attn_implementation)
    batch = pack_examples(packed_docs(), max_len=16, pad_id=0)
    real = batch.document_ids != 0
    with torch.no_grad():
        explicit = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=document_attention_mask(batch.document_ids, dtype=torch.float32),
        ).logits
        implicit = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        cached = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    torch.testing.assert_close(implicit[real], explicit[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached[real], explicit[real], atol=1e-3)
