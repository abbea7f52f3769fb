"""Token-level sampling transforms shared by the PyTorch sampler (and mirrored by vLLM)."""

from __future__ import annotations

import torch


def _nucleus_sorted(sorted_probs: torch.Tensor, top_p: float, min_p: float) -> torch.Tensor:
    """sorted_probs FloatTensor[B, V] (each row in descending order) -> BoolTensor[B, V]: the
    tokens kept by min-p (``p >= min_p * max p``), then top-p over what min-p kept (a token is
    kept while the mass before it is below ``top_p`` of that mass; the top token always is)."""
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if min_p > 0.0:
        keep = sorted_probs >= min_p * sorted_probs[..., :1]
    if top_p < 1.0:
        kept = sorted_probs * keep
        cumulative = kept.cumsum(dim=-1)
        keep = keep & ((cumulative - kept) < top_p * cumulative[..., -1:])
    return keep


def filter_top_p_min_p(probs: torch.Tensor, top_p: float, min_p: float) -> torch.Tensor:
    """Zero out tokens outside the nucleus and below ``min_p * max prob``; renormalise.

    probs: FloatTensor[B, V] (rows sum to 1) -> FloatTensor[B, V]
    """
    if top_p >= 1.0 and min_p <= 0.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, _nucleus_sorted(sorted_probs, top_p, min_p))
    probs = probs.masked_fill(~keep, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_top_p_min_p(probs: torch.Tensor, top_p: float, min_p: float, rng: torch.Generator) -> torch.Tensor:
    """One token per row from ``filter_top_p_min_p(probs, top_p, min_p)``: LongTensor[B].

    Draws in the sorted order that the truncation needs anyway, so nothing is scattered back
    or renormalised over the whole vocabulary (``multinomial`` takes unnormalised weights).
    """
    if top_p >= 1.0 and min_p <= 0.0:
        return torch.multinomial(probs, 1, generator=rng).squeeze(-1)
    sorted_probs, order = _candidates(probs, min_p)
    choice = torch.multinomial(sorted_probs * _nucleus_sorted(sorted_probs, top_p, min_p), 1, generator=rng)
    return order.gather(-1, choice).squeeze(-1)


def _candidates(probs: torch.Tensor, min_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [B, V] -> (probabilities [B, K] in descending order, their token ids [B, K]): the
    K most likely tokens of each row, where K is the most tokens any row keeps under min-p
    (every token min-p keeps is among them), or the whole sorted vocabulary without min-p.
    A trained model keeps a handful of tokens, so this is a small top-k instead of a sort of
    the vocabulary at every decoding step (which took 10% of the PyTorch sampler's time)."""
    if min_p <= 0.0:
        return probs.sort(dim=-1, descending=True)
    kept = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    return probs.topk(int(kept.sum(dim=-1).max()), dim=-1)


def ends_with_any(sequence: list[int], stops: tuple[tuple[int, ...], ...]) -> bool:
    return any(len(stop) <= len(sequence) and tuple(sequence[-len(stop) :]) == stop for stop in stops)
