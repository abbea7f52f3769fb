"""Shared check of the generator tests: sampled tokens lie inside the top-p / min-p nucleus."""

from __future__ import annotations

import torch

from fastmath_nemo.generation.base import Rollouts
from fastmath_nemo.generation.sampling import filter_top_p_min_p


def assert_drawn_inside_nucleus(model, prompts: list[list[int]], out: Rollouts, temperature: float,
                                top_p: float, min_p: float) -> None:
    """Every token of ``out`` has non-zero probability after the truncation at ``temperature``
    (recomputed with ``model``, one full forward per rollout, no cache)."""
    with torch.no_grad():
        for p, toks in zip(out.prompt_index, out.token_ids):
            logits = model(input_ids=torch.tensor([prompts[p] + toks])).logits[0, len(prompts[p]) - 1 : -1]
            kept = filter_top_p_min_p(torch.softmax(logits.float() / temperature, -1), top_p, min_p)
            assert (kept.gather(-1, torch.tensor(toks)[:, None]) > 0).all(), f"a token of prompt {p} outside the nucleus"
