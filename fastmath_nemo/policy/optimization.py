"""What both policy backends share about an optimizer step: the learning-rate schedule and
the error that stops a step whose loss or gradient is not finite."""

from __future__ import annotations

import math


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer step, so the weights and the last checkpoint stay good."""


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
