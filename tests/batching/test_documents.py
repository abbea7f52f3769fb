"""The document layout of packed rows (fastmath_nemo.batching.documents): every form computed
from the same rows agrees, by hand-derived values and against each other, and the proof that
packed documents do not attend to each other in a real transformers model."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastmath_nemo.batching.documents import (
    allowed_attention,
    blocked_attention,
    cu_seqlens,
    document_attention_mask,
    document_runs,
    document_spans,
    has_padding,
    is_packed,
    segment_bounds,
)
from fastmath_nemo.data.packing import pack_examples

# two rows of 8: documents of 3 and 4 then one pad; one document of 5 then three pads
ROWS = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]])


def test_runs_spans_and_segments_by_hand() -> None:
    assert document_runs(ROWS) == [[(0, 3, 1), (3, 7, 2), (7, 8, 0)], [(0, 5, 1), (5, 8, 0)]]
    assert segment_bounds(ROWS) == [[(0, 3), (3, 7), (7, 8)], [(0, 5), (5, 8)]]  # padding is a segment
    assert document_spans(ROWS) == [[(0, 3), (3, 7)], [(0, 5)]]  # padding is not a document
    assert is_packed(ROWS) and has_padding(ROWS)
    assert not is_packed(ROWS[1:]) and not has_padding(torch.ones(2, 4, dtype=torch.long))


def test_a_document_split_into_two_runs_is_refused() -> None:
    with pytest.raises(ValueError, match="row 0: a document is split"):
        document_spans(torch.tensor([[1, 1, 2, 1]]))


def test_cu_seqlens_cut_the_flattened_rows_where_documents_and_rows_end() -> None:
    # row 0's padding (position 7) and row 1's first document (8) are two segments although
    # row 1 starts with document 1 again: a row's end ends a segment
    assert cu_seqlens(ROWS).tolist() == [0, 3, 7, 8, 13, 16]
    assert cu_seqlens(ROWS).dtype == torch.int32
    flattened = [start + r * ROWS.size(1) for r, row in enumerate(segment_bounds(ROWS)) for start, _ in row]
    assert cu_seqlens(ROWS).tolist() == flattened + [ROWS.numel()]


def test_allowed_attention_by_hand_and_at_a_ranks_positions() -> None:
    full = allowed_attention(ROWS)
    assert full.shape == (2, 1, 8, 8)
    assert full[0, 0, 4].long().tolist() == [0, 0, 0, 1, 1, 0, 0, 0]  # doc 2's 2nd token: doc 2 up to itself
    assert full[0, 0, 7].long().tolist() == [0] * 7 + [1]  # padding attends to itself only
    positions = torch.tensor([0, 1, 6, 7])  # context parallelism's rank 0 of 2
    assert torch.equal(allowed_attention(ROWS, positions), full[:, :, positions])
    assert torch.equal(blocked_attention(ROWS, positions), ~full[:, :, positions])
    # the dense mask allows exactly the keys of each query's own segment, up to the query
    for r, row in enumerate(segment_bounds(ROWS)):
        for start, end in row:
            for q in range(start, end):
                keys = full[r, 0, q].nonzero().squeeze(-1).tolist()
                assert keys == (list(range(start, q + 1)) if ROWS[r, q] != 0 else [q])


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
