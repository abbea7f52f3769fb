"""Per-document causal attention for packed rows, without a ``[T, T]`` mask.

A packed row's documents never attend to each other, so instead of one SDPA call under a
``[b, 1, T, T]`` block-diagonal mask (which makes SDPA compute and hold the whole ``T x T``
score matrix: 0.6 G entries per head at T = 24,000), each document is its own causal SDPA
call: ``is_causal=True`` keeps torch on its flash / memory-efficient kernels, and memory is
``O(longest document)`` per call, never ``O(T^2)`` over the row.

Runs of equal ``document_ids`` are the segments; padding (document 0) at the end of a row is
one more causal segment whose outputs nobody reads (it never attends to a real document,
and no query is left without a key, which would give NaN).

Under context parallelism the queries are this rank's two load-balanced chunks and the keys
are the whole row (``context_parallel.py``). A chunk may start in the middle of a document,
so its queries see the document's earlier keys too: the piece of the chunk inside one
document, queries ``[a, b)`` of a document that starts at ``d``, attends keys ``[d, b)``
under a lower-right-aligned causal mask. That mask is built for at most
:data:`QUERY_BLOCK` queries at a time, so its memory is ``QUERY_BLOCK x T``, linear in T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Most queries per masked SDPA call under context parallelism: bounds the [block, keys] mask
# and the scores of SDPA's math kernel, where it falls back to it, to QUERY_BLOCK x T.
QUERY_BLOCK = 1024


def _contiguous_ranges(positions: list[int]) -> list[tuple[int, int, int]]:
    """``positions`` as maximal ``(start, end, index of start in positions)`` runs of
    consecutive positions, in order."""
    ranges: list[tuple[int, int, int]] = []
    for index, p in enumerate(positions):
        if ranges and ranges[-1][1] == p:
            ranges[-1] = (ranges[-1][0], p + 1, ranges[-1][2])
        else:
            ranges.append((p, p + 1, index))
    return ranges


def _causal_pieces(
    segments: list[tuple[int, int]], ranges: list[tuple[int, int, int]]
) -> list[tuple[int, int, int, int]]:
    """``(query_start, query_end, key_start, query_index)`` per piece, in query order: each
    query range cut at segment bounds; keys run from the start of the piece's segment to
    ``query_end``; ``query_index`` is where the piece's first query sits among the queries."""
    pieces = []
    for lo, hi, index in ranges:
        for start, end in segments:
            a, b = max(lo, start), min(hi, end)
            if a < b:
                pieces.append((a, b, start, index + a - lo))
    return pieces


def document_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segments: list[list[tuple[int, int]]],
    *,
    query_positions: list[int] | None = None,
    scale: float,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
) -> Tensor:
    """Causal attention inside each segment.

    q: [b, h, sq, d]; k, v: [b, g, sk, d] (the whole row); segments: per row, ``[start, end)``
    runs of key positions (``batching.documents.segment_bounds``); query_positions: the key position of each
    of the ``sq`` queries, in ascending runs (None: ``sq == sk`` and query ``i`` is position
    ``i``). Returns the context [b, h, sq, d].
    """
    positions = list(range(k.size(2))) if query_positions is None else query_positions
    if len(positions) != q.size(2):
        raise ValueError(f"{q.size(2)} queries but {len(positions)} query positions")
    ranges = _contiguous_ranges(positions)
    extra = {"enable_gqa": True} if enable_gqa else {}
    rows = []
    for i, row_segments in enumerate(segments):
        parts = []
        for a, b, start, index in _causal_pieces(row_segments, ranges):
            if a == start:
                # the piece starts its document: queries and keys start together, SDPA's own
                # causal mask (flash / memory-efficient kernels, no mask tensor)
                parts.append(F.scaled_dot_product_attention(
                    q[i : i + 1, :, index : index + b - a], k[i : i + 1, :, a:b], v[i : i + 1, :, a:b],
                    dropout_p=dropout_p, is_causal=True, scale=scale, **extra))
                continue
            # mid-document (context parallelism): query lo + j sees keys start .. lo + j, a
            # lower-right aligned causal mask, built for QUERY_BLOCK queries at a time
            for lo in range(a, b, QUERY_BLOCK):
                hi = min(b, lo + QUERY_BLOCK)
                keys = torch.arange(start, hi, device=q.device)
                mask = keys[None, :] <= torch.arange(lo, hi, device=q.device)[:, None]
                parts.append(F.scaled_dot_product_attention(
                    q[i : i + 1, :, index + lo - a : index + hi - a], k[i : i + 1, :, start:hi],
                    v[i : i + 1, :, start:hi], attn_mask=mask, dropout_p=dropout_p, scale=scale, **extra))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)
