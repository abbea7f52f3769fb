"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for megatron-core.

A drop-in for megatron-core 0.16.1's local ``DotProductAttention`` (same constructor and
forward signature; 0.16.1 has no ``CoreAttentionInterface``, so it is plugged into
``SelfAttentionSubmodules.core_attention``, see ``layer_spec.gpt_layer_spec``). It avoids the
unfused path's [b, h, s, s] fp32 score buffer and lets torch pick a flash / memory-efficient
kernel on GPU.

Masks follow megatron's convention, as ``SelfAttention`` passes ``attention_mask`` through
unchanged from ``GPTModel.forward``:

- ``None``: causal (``AttnMaskType.causal``), no mask tensor is built.
- bool ``[b, 1, sq, sk]``: True = blocked (megatron's ``masked_fill`` convention; the
  *opposite* of SDPA's and of ``batching.documents.allowed_attention``). It replaces the causal
  mask, as in the unfused path, so a packed row passes its per-document causal mask here.
- float ``[b, 1, sq, sk]``: additive (0 = attend, very negative = blocked), used as is.

No query row may be fully blocked (SDPA returns NaN there; megatron's unfused path would
attend uniformly).

- integer ``[b, s]``: the rows' ``document_ids`` (``Batch`` convention, 0 = padding), for
  packed rows: causal attention inside each document, one SDPA call per document
  (``document_attention.py``), so memory grows with the longest document, not with ``s^2``.
  This is ``policy.packed_attention=per_document``; a bool mask is the ``dense`` baseline.

Under context parallelism the queries are this rank's slice of the row and keys / values are
all-gathered to the whole row (``context_parallel.py``); the mask is then the whole rows'
``document_ids`` [b, s] (queries at this rank's positions) or the dense ``[b, 1, s / cp, s]``.

Packed sequences in megatron's ``thd`` format (``PackedSeqParams``, what Transformer Engine's
attention consumes, see ``thd.py``) are accepted too, one causal SDPA call per ``cu_seqlens``
segment: the CPU tests of that format run on this module.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from fastmath_nemo.batching.documents import segment_bounds
from fastmath_nemo.policy.megatron.context_parallel import gather_sequence, local_positions
from fastmath_nemo.policy.megatron.document_attention import document_attention

# torch >= 2.5 broadcasts kv heads itself (no repeated K/V in memory).
_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class SDPAAttention(MegatronModule):
    """Core attention: [s, b, h, d] query/key/value in, [s, b, h_local * d] context out."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if config.window_size is not None:
            raise ValueError("SDPAAttention does not support sliding-window attention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        tp_size = pg_collection.tp.size()
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the
        # scores back before softmax (an fp16 overflow guard): the net scale is this one.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] (np, ng: this TP rank's heads and
        query groups); attention_mask None, bool or additive [b, 1, sq, sk], or integer
        document ids [b, sk] (module docstring). Returns the context [sq, b, np * hn]."""
        segments = None  # per row, [start, end) of each causal segment (per-document path)
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd" or self.config.context_parallel_size > 1:
                raise ValueError("SDPAAttention takes PackedSeqParams in the thd format, without context parallelism")
            # [t, h, d] (megatron squeezes the dummy batch of one): back to [t, 1, h, d]; one
            # causal segment per cu_seqlens interval
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            segments = [list(zip(bounds[:-1], bounds[1:]))]
        elif attention_mask is not None and not attention_mask.is_floating_point() and attention_mask.dim() == 2:
            segments = segment_bounds(attention_mask)
            attention_mask = None
        if attention_bias is not None:
            raise ValueError("SDPAAttention does not support attention_bias")
        query_positions = None
        if self.config.context_parallel_size > 1:
            # this rank's queries against the whole row's keys and values (context_parallel.py)
            if attention_mask is None and segments is None:
                raise ValueError("under context parallelism the policy passes document ids [b, s] or a "
                                 "[b, 1, s / cp, s] mask")
            key, value = gather_sequence(key), gather_sequence(value)
            if segments is not None:
                rank = parallel_state.get_context_parallel_rank()
                query_positions = local_positions(key.size(0), self.config.context_parallel_size, rank).tolist()
        sq, sk = query.size(0), key.size(0)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        extra = {}
        if self.num_heads_per_partition != self.num_groups_per_partition:
            if _HAS_ENABLE_GQA:
                extra["enable_gqa"] = True
            else:
                repeat = self.num_heads_per_partition // self.num_groups_per_partition
                k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)

        mask = attention_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = ~mask  # megatron: True = blocked; SDPA: True = attend
        elif mask is not None:
            mask = mask.to(q.dtype)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        # Like the unfused path: an explicit mask replaces the causal one; one query (decode
        # step against a cache) attends to every key.
        is_causal = segments is None and mask is None and mask_type == AttnMaskType.causal and sq > 1
        if is_causal and sq != sk:
            raise ValueError(f"causal self-attention needs sq == sk, got {sq} and {sk}")

        dropout_p = self.dropout_p if self.training else 0.0
        # Dropout inside the TP region draws from the model-parallel RNG, as megatron's does.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout_p > 0.0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            if segments is not None:
                context = document_attention(q, k, v, segments, query_positions=query_positions, scale=self.softmax_scale,
                                             dropout_p=dropout_p, enable_gqa=bool(extra))
            else:
                context = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale,
                    **extra
                )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, context.size(0), -1)
