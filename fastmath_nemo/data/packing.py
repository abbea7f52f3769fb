"""Pack tokenized ``(ids, target_mask)`` examples into ``Batch`` rows, and the attention mask
that keeps packed documents apart.

Layout follows ``fastmath_nemo.batch``: ``position_ids`` restart at 0 per document,
``document_ids`` are 1.. per row and 0 on padding, and ``loss_mask`` is the target mask with
each document's first token forced to 0 (its logprob would be conditioned on the previous
document, which it cannot see).

Attention masks for Hugging Face models (checked against transformers 5.19,
``masking_utils._preprocess_mask_arguments``): a 4D ``attention_mask`` of shape
``[B, 1, T, T]`` is passed to the attention kernels as-is, without conversion. What it must
contain depends on ``attn_implementation``:

- ``"sdpa"``: a bool mask (True = may attend) or an additive float mask, both work.
- ``"eager"``: only an additive float mask (0 = attend, ``finfo(dtype).min`` = blocked) in the
  model's dtype. Eager *adds* the mask to the scores, so a bool mask silently becomes
  +1 / +0 and attends across documents.

``document_attention_mask(document_ids, dtype=model.dtype)`` gives the additive form, which is
right for both, with or without a KV cache (tests/data/test_packing.py checks sdpa and eager
against per-document runs). ``"flash_attention_2"`` / ``"flex_attention"`` take no dense 4D
mask; there, pass ``attention_mask=None`` with the restarting ``position_ids`` and let
transformers derive the documents (not checked here: no GPU kernels in the CPU tests). For
sdpa / eager that implicit path works only with ``use_cache=False``: the detection is skipped
whenever a cache exists and ``use_cache`` defaults to True (also in train mode), which silently
attends across documents. A dense mask costs ``B * T * T`` elements.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from fastmath_nemo.batch import Batch, batch_from_sequences

logger = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]  # (token ids, target mask: 1 = loss on this token)
PackMethod = Literal["ffd", "sequential"]

__all__ = [
    "Example",
    "document_attention_mask",
    "fit_to_length",
    "pack_examples",
    "packed_micro_batches",
    "plan_rows",
    "rows_to_batch",
    "unpacked_batch",
]


def fit_to_length(examples: Sequence[Example], max_len: int, *, truncate: bool = True) -> list[Example]:
    """Validate examples and cut those longer than ``max_len`` tokens.

    truncate: keep the first ``max_len`` tokens of a long example (one WARNING with the count:
        a truncated SFT example loses its end-of-turn token); if False, raise ``ValueError``.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out: list[Example] = []
    n_truncated = 0
    for i, (ids, mask) in enumerate(examples):
        if len(ids) == 0:
            raise ValueError(f"example {i} is empty")
        if len(mask) != len(ids):
            raise ValueError(f"example {i}: target mask has {len(mask)} entries for {len(ids)} tokens")
        if len(ids) > max_len:
            if not truncate:
                raise ValueError(f"example {i} has {len(ids)} tokens > max_len={max_len} (truncate=False)")
            n_truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        out.append((list(ids), list(mask)))
    if n_truncated:
        logger.warning("truncated %d of %d examples to max_len=%d tokens", n_truncated, len(out), max_len)
    return out


def plan_rows(lengths: Sequence[int], max_len: int, *, method: PackMethod = "ffd") -> list[list[int]]:
    """Group example indices into rows of at most ``max_len`` tokens in total.

    method: ``"ffd"`` = first-fit decreasing (longest first, each into the first row with room;
        few rows, little padding); ``"sequential"`` = keep input order, start a new row when the
        next example does not fit. Every length must be in ``[1, max_len]``.
    Returns, per row, the indices of its examples in packing order; every index appears once.
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_len:
            raise ValueError(f"example {i} has length {n}, outside [1, max_len={max_len}]")
    if method == "sequential":
        rows: list[list[int]] = []
        used = max_len  # forces a new row for the first example
        for i, n in enumerate(lengths):
            if used + n > max_len:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows
    if method == "ffd":
        return _first_fit_decreasing(lengths, max_len)
    raise ValueError(f"unknown packing method {method!r} (use 'ffd' or 'sequential')")


def _first_fit_decreasing(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    # Segment tree over (potential) rows holding their free space, so "first row with room"
    # is O(log n) instead of a scan over all open rows.
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [max_len] * (2 * size)
    rows: list[list[int]] = []
    for i in sorted(range(n), key=lambda k: -lengths[k]):  # stable: ties keep input order
        need = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost leaf with free >= need
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def rows_to_batch(
    examples: Sequence[Example],
    rows: Sequence[Sequence[int]],
    pad_id: int,
    *,
    pad_to: int | None = None,
) -> Batch:
    """One packed row per entry of ``rows`` (indices into ``examples``), right-padded.

    pad_to: row width ``T`` (e.g. ``max_len`` for static shapes); default the longest row.
    Returns a ``Batch`` with every field ``[len(rows), T]``; layout as in ``fastmath_nemo.batch``.
    """
    if not rows:
        raise ValueError("no rows to batch")
    width = max(sum(len(examples[i][0]) for i in row) for row in rows)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({width} tokens)")
        width = pad_to
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.float32)
    for r, row in enumerate(rows):
        start = 0
        for doc, i in enumerate(row, start=1):
            ids, mask = examples[i]
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, start:end] = torch.arange(len(ids))
            document_ids[r, start:end] = doc
            loss_mask[r, start:end] = torch.tensor(mask, dtype=torch.float32)
            loss_mask[r, start] = 0.0  # nothing to condition the first token on
            start = end
    return Batch(input_ids, position_ids, document_ids, loss_mask)


def pack_examples(
    examples: Sequence[Example],
    max_len: int,
    pad_id: int,
    *,
    truncate: bool = True,
    method: PackMethod = "ffd",
    pad_to_max_len: bool = False,
) -> Batch:
    """Pack all examples into as few rows of <= ``max_len`` tokens as ``method`` finds.

    Returns a ``Batch`` with fields ``[R, T]``; ``T`` is the longest packed row, or ``max_len``
    with ``pad_to_max_len`` (static shapes).
    """
    fitted = fit_to_length(examples, max_len, truncate=truncate)
    rows = plan_rows([len(ids) for ids, _ in fitted], max_len, method=method)
    return rows_to_batch(fitted, rows, pad_id, pad_to=max_len if pad_to_max_len else None)


def unpacked_batch(examples: Sequence[Example], pad_id: int) -> Batch:
    """One example per row, right-padded: fields ``[len(examples), longest example]``."""
    if not examples:
        raise ValueError("no examples to batch")
    return batch_from_sequences([list(ids) for ids, _ in examples], [list(m) for _, m in examples], pad_id)


def packed_micro_batches(
    examples: Sequence[Example],
    *,
    max_len: int,
    pad_id: int,
    rows_per_batch: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    truncate: bool = True,
    method: PackMethod = "ffd",
    pad_to_max_len: bool = False,
) -> Iterator[Batch]:
    """Pack ``examples`` into rows, then yield micro-batches of ``rows_per_batch`` rows.

    The packing is deterministic; the order of the rows is shuffled with a generator seeded by
    ``(seed, epoch)``, so each epoch sees a different, reproducible order. Each micro-batch is
    padded to its own longest row (or to ``max_len`` with ``pad_to_max_len``). The last, smaller
    micro-batch is yielded unless ``drop_last``.
    """
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    fitted = fit_to_length(examples, max_len, truncate=truncate)
    rows = plan_rows([len(ids) for ids, _ in fitted], max_len, method=method)
    if shuffle:
        # A string seed is hashed deterministically (unlike tuples), and seed/epoch pairs
        # such as (0, 1) and (1, 0) do not collide as they would with seed + epoch.
        random.Random(f"fastmath_nemo.packing:{seed}:{epoch}").shuffle(rows)
    for start in range(0, len(rows), rows_per_batch):
        group = rows[start : start + rows_per_batch]
        if drop_last and len(group) < rows_per_batch:
            return
        yield rows_to_batch(fitted, group, pad_id, pad_to=max_len if pad_to_max_len else None)


def document_attention_mask(document_ids: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal, document-local attention mask for packed rows.

    document_ids: LongTensor[B, T] (0 = padding, 1.. = document within the row).
    Returns ``[B, 1, T, T]`` (query t, key s): query t may attend key s iff both are in the same
    nonzero document and ``s <= t``. A padding query attends only to itself, so no query row is
    fully blocked (that would make softmax produce NaN).

    dtype None: BoolTensor, True = may attend (accepted by SDPA).
    dtype given: additive mask in that dtype, 0 = attend, ``torch.finfo(dtype).min`` = blocked
        (accepted by both SDPA and eager; pass the model's dtype). Use it as
        ``model(input_ids, position_ids=..., attention_mask=mask)``.
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be [B, T], got shape {tuple(document_ids.shape)}")
    t = document_ids.shape[1]
    device = document_ids.device
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T_q, T_k]
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    is_token = (document_ids != 0)[:, :, None]
    self_only = torch.eye(t, dtype=torch.bool, device=device)
    allowed = ((same_doc & causal & is_token) | (self_only & ~is_token))[:, None]
    if dtype is None:
        return allowed
    if not dtype.is_floating_point:
        raise ValueError(f"an additive mask needs a floating dtype, got {dtype}")
    blocked = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, blocked)
