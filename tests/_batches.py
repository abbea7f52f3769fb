"""Test helper: right-padded batches of given row lengths."""

from __future__ import annotations

from fastmath_nemo.batching.batch import Batch, batch_from_sequences


def batch_of_lengths(lengths: list[int], prompt: int = 2) -> Batch:
    """One row per length; each row's first ``prompt`` tokens are not targets."""
    seqs = [[(7 * i + t) % 50 + 1 for t in range(n)] for i, n in enumerate(lengths)]
    masks = [[0] * min(prompt, n) + [1] * max(0, n - prompt) for n in lengths]
    return batch_from_sequences(seqs, masks, pad_id=0)
