"""Token-level sampling transforms shared by the PyTorch sampler (and mirrored by vLLM)."""

from __future__ import annotations

import torch


def filter_top_p_min_p(probs: torch.Tensor, top_p: float, min_p: float) -> torch.Tensor:
    """Zero out tokens outside the nucleus and below ``min_p * max prob``; renormalise.

    probs: FloatTensor[B, V] (rows sum to 1) -> FloatTensor[B, V]
    """
    if min_p > 0.0:
        threshold = min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        # Keep a token if the mass before it is below top_p (so the top token is always kept).
        keep_sorted = (cumulative - sorted_probs) < top_p * cumulative[..., -1:]
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def ends_with_any(sequence: list[int], stops: tuple[tuple[int, ...], ...]) -> bool:
    return any(len(stop) <= len(sequence) and tuple(sequence[-len(stop) :]) == stop for stop in stops)
