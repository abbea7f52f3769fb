"""Packed rows in megatron's ``thd`` format, the one Transformer Engine's attention takes.

A :class:`~fastmath_nemo.batch.Batch` of ``B`` rows x ``T`` tokens (documents packed in each
row, padding at the end) becomes one sequence of ``N = B * T`` tokens, ``[1, N]``, cut into
segments by ``cu_seqlens``: one per document of each row and one per row's padding run.
Attention stays inside a segment (causal), and megatron's RoPE restarts positions at each
segment, as the Batch's ``position_ids`` do. Padding segments compute values nobody reads.

TE's spec cannot use the per-row ``[b, 1, s, s]`` mask the SDPA spec takes (its fused
kernels take a mask *type* and ``cu_seqlens``), so the Megatron policy feeds it this format.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor


def thd_params(document_ids: Tensor) -> PackedSeqParams:
    """``PackedSeqParams`` of the row-major flattening of ``document_ids`` [B, T] (0 = padding)."""
    rows, width = document_ids.shape
    flat = document_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    row_start = torch.arange(flat.numel(), device=flat.device) % width == 0
    starts[1:] = (flat[1:] != flat[:-1]) | row_start[1:]
    bounds = torch.cat([starts.nonzero().squeeze(1), torch.tensor([flat.numel()], device=flat.device)])
    cu_seqlens = bounds.to(torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)

