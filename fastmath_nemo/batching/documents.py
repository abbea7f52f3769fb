"""Where a packed row's documents start and end, in every form a backend consumes.

A row's ``document_ids`` (:mod:`fastmath_nemo.batching.batch`) number its documents 1, 2, ...
in contiguous runs, with 0 on padding. Attention never crosses a document: each backend
path takes that layout in its own form, and every form is computed here.

==========================  ==========================================  =====================
form                        what it is                                  who takes it
==========================  ==========================================  =====================
:func:`document_spans`      per row, ``(start, end)`` of each document  transformers' per-document attention
:func:`segment_bounds`      per row, ``(start, end)`` of every run,     megatron's SDPA core attention
                            the padding run too
:func:`cu_seqlens`          run boundaries of the row-major flattening  megatron's ``thd`` format (TE)
:func:`allowed_attention`   ``[B, 1, S, T]`` bool, True = may attend    the dense baseline; context parallelism
:func:`blocked_attention`   the same, True = blocked                    megatron's masks
:func:`document_attention_mask`  bool or additive ``[B, 1, T, T]``      transformers' dense path
==========================  ==========================================  =====================

The dense forms cost ``B x S x T`` elements; the others are linear in T.
"""

from __future__ import annotations

import torch


def is_packed(document_ids: torch.Tensor) -> bool:
    """Whether any row of ``document_ids`` [B, T] holds more than one document."""
    return bool((document_ids.max(dim=-1).values > 1).any())


def has_padding(document_ids: torch.Tensor) -> bool:
    """Whether any position of ``document_ids`` [B, T] is padding (document 0)."""
    return bool((document_ids == 0).any())


def run_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """BoolTensor[B, T], on the input's device: True where a run of equal document ids begins
    (position 0 of every row always does)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_runs(document_ids: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row of ``document_ids`` [B, T], ``(start, end, document id)`` of each run of equal
    ids in order, padding runs (id 0) included. Reads host values (one small copy)."""
    ids = document_ids.detach().cpu()
    starts = run_starts(ids)
    width = ids.shape[1]
    runs: list[list[tuple[int, int, int]]] = []
    for row in range(ids.shape[0]):
        begin = starts[row].nonzero().squeeze(-1).tolist()
        runs.append(list(zip(begin, begin[1:] + [width], ids[row, begin].tolist())))
    return runs


def segment_bounds(document_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``[start, end)`` of every run of equal document id of ``document_ids``
    [B, T]: each document and each padding run is one causal segment."""
    return [[(start, end) for start, end, _ in row] for row in document_runs(document_ids)]


def document_spans(document_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of ``document_ids`` [B, T], the ``(start, end)`` token range of each document
    (padding left out), in order.

    Documents must be contiguous runs (as ``data/packing.py`` builds them); a document id that
    appears in two runs would be attended as two documents, so it is an error.
    """
    spans: list[list[tuple[int, int]]] = []
    for index, row in enumerate(document_runs(document_ids)):
        documents = [doc for _, _, doc in row if doc != 0]
        if len(documents) != len(set(documents)):
            raise ValueError(f"row {index}: a document is split into several runs "
                             f"(document ids {[doc for _, _, doc in row]})")
        spans.append([(start, end) for start, end, doc in row if doc != 0])
    return spans


def cu_seqlens(document_ids: torch.Tensor) -> torch.Tensor:
    """IntTensor[S + 1] on the input's device: the boundaries of the ``S`` runs of the row-major
    flattening of ``document_ids`` [B, T] (a run also ends where a row ends), from 0 to
    ``B * T``: segment ``i`` is tokens ``[cu[i], cu[i + 1])`` of the flattened ``[1, B * T]``."""
    starts = run_starts(document_ids).reshape(-1)
    end = torch.tensor([starts.numel()], device=starts.device)
    return torch.cat([starts.nonzero().squeeze(1), end]).to(torch.int32)


def allowed_attention(document_ids: torch.Tensor, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Causal, document-local attention: BoolTensor[B, 1, S, T], True = query may attend key.

    document_ids: LongTensor[B, T]. query_positions: LongTensor[S], the row positions of the
    queries (None: every position, ``S = T``; context parallelism passes a rank's positions).
    Query ``q`` may attend key ``k`` iff both are in the same nonzero document and ``k <= q``;
    a padding query attends only to itself, so no query is fully blocked (softmax would give NaN).
    """
    keys = torch.arange(document_ids.size(1), device=document_ids.device)
    queries = keys if query_positions is None else query_positions
    query_docs = document_ids[:, queries, None]  # [B, S, 1]
    same_doc = query_docs == document_ids[:, None, :]  # [B, S, T]
    causal = keys[None, :] <= queries[:, None]
    is_token = query_docs != 0
    itself = keys[None, :] == queries[:, None]
    return ((same_doc & causal & is_token) | (itself & ~is_token))[:, None]


def blocked_attention(document_ids: torch.Tensor, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`allowed_attention` in megatron's convention: True = blocked."""
    return ~allowed_attention(document_ids, query_positions)


def document_attention_mask(document_ids: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The per-document causal mask for Hugging Face models, ``[B, 1, T, T]`` (query t, key s).

    dtype None: BoolTensor, True = may attend (:func:`allowed_attention`; SDPA takes it).
    dtype given: additive, 0 = attend, ``torch.finfo(dtype).min`` = blocked; pass the model's
    dtype. Use it as ``model(input_ids, position_ids=..., attention_mask=mask)``.

    Checked against transformers 5.19 (``masking_utils._preprocess_mask_arguments``): a 4D
    ``attention_mask`` reaches the attention kernels as it is. ``"sdpa"`` takes a bool or an
    additive mask; ``"eager"`` only an additive one in the model's dtype (it *adds* the mask to
    the scores, so a bool mask silently becomes +1 / +0 and attends across documents). The
    additive form is right for both, with or without a KV cache (tests/batching/test_documents.py
    checks sdpa and eager against per-document runs). ``"flash_attention_2"`` /
    ``"flex_attention"`` take no dense 4D mask: pass ``attention_mask=None`` with the restarting
    ``position_ids`` and let transformers derive the documents (not checked here: no GPU kernels
    in the CPU tests). For sdpa / eager that implicit path works only with ``use_cache=False``:
    the detection is skipped whenever a cache exists and ``use_cache`` defaults to True (also in
    train mode), which silently attends across documents.
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be [B, T], got shape {tuple(document_ids.shape)}")
    allowed = allowed_attention(document_ids)
    if dtype is None:
        return allowed
    if not dtype.is_floating_point:
        raise ValueError(f"an additive mask needs a floating dtype, got {dtype}")
    blocked = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device).masked_fill(~allowed, blocked)
