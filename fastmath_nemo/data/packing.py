"""Pack tokenized ``(ids, target_mask)`` examples into ``Batch`` rows.

Layout follows ``fastmath_nemo.batching.batch``: ``position_ids`` restart at 0 per document,
``document_ids`` are 1.. per row and 0 on padding, and ``loss_mask`` is the target mask with
each document's first token forced to 0 (its logprob would be conditioned on the previous
document, which it cannot see). How attention keeps the documents apart, in each backend's
form, is :mod:`fastmath_nemo.batching.documents`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from fastmath_nemo.batching.batch import Batch, batch_from_sequences

logger = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]  # (token ids, target mask: 1 = loss on this token)
PackMethod = Literal["ffd", "sequential"]

__all__ = [
    "Example",
    "fit_to_length",
    "pack_examples",
    "packed_step_batches",
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
    Returns a ``Batch`` with every field ``[len(rows), T]``; layout as in ``fastmath_nemo.batching.batch``.
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


def packed_step_batches(
    examples: Sequence[Example],
    *,
    max_len: int,
    pad_id: int,
    rows_per_step: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    truncate: bool = True,
    method: PackMethod = "ffd",
    pad_to_max_len: bool = False,
) -> Iterator[Batch]:
    """Pack ``examples`` into rows, then yield one optimizer step's batch of ``rows_per_step``
    rows at a time (the loop splits each into micro-batches, ``batching.micro_batches``).

    The packing is deterministic; the order of the rows is shuffled with a generator seeded by
    ``(seed, epoch)``, so each epoch sees a different, reproducible order. Each step batch is
    padded to its own longest row (or to ``max_len`` with ``pad_to_max_len``). The last, smaller
    step batch is yielded unless ``drop_last``.
    """
    if rows_per_step < 1:
        raise ValueError(f"rows_per_step must be >= 1, got {rows_per_step}")
    fitted = fit_to_length(examples, max_len, truncate=truncate)
    rows = plan_rows([len(ids) for ids, _ in fitted], max_len, method=method)
    if shuffle:
        # A string seed is hashed deterministically (unlike tuples), and seed/epoch pairs
        # such as (0, 1) and (1, 0) do not collide as they would with seed + epoch.
        random.Random(f"fastmath_nemo.packing:{seed}:{epoch}").shuffle(rows)
    for start in range(0, len(rows), rows_per_step):
        group = rows[start : start + rows_per_step]
        if drop_last and len(group) < rows_per_step:
            return
        yield rows_to_batch(fitted, group, pad_id, pad_to=max_len if pad_to_max_len else None)
