"""Packed rows in megatron's ``thd`` format, the one Transformer Engine's attention takes.

A :class:`~fastmath_nemo.batching.batch.Batch` of ``B`` rows x ``T`` tokens (documents packed in each
row, padding at the end) becomes one sequence of ``N = B * T`` tokens, ``[1, N]``, cut into
segments by ``cu_seqlens`` (``batching.documents.cu_seqlens``): one per document of each row
and one per row's padding run.
Attention stays inside a segment (causal), and megatron's RoPE restarts positions at each
segment, as the Batch's ``position_ids`` do. Padding segments compute values nobody reads.

TE's spec cannot use the per-row ``[b, 1, s, s]`` mask the SDPA spec takes (its fused
kernels take a mask *type* and ``cu_seqlens``), so the Megatron policy feeds it this format.
"""

from __future__ import annotations

from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from fastmath_nemo.batching.documents import cu_seqlens as document_cu_seqlens


def thd_params(document_ids: Tensor) -> PackedSeqParams:
    """``PackedSeqParams`` of the row-major flattening of ``document_ids`` [B, T] (0 = padding)."""
    cu_seqlens = document_cu_seqlens(document_ids)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)

