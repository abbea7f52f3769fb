"""What both policy backends share about an optimizer step: the learning-rate schedule and
the error that stops a step whose loss or gradient is not finite."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer step, so the weights and the last checkpoint stay good."""


def non_finite_loss(ranks: list[int], world: int, totals: Mapping[str, float]) -> NonFiniteLossError:
    """The error every rank raises when the step's loss is not finite: ``ranks`` are those whose
    own micro-batches gave it (``utils.distributed.ranks_where``), so the message names them."""
    where = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
    return NonFiniteLossError(f"non-finite loss on {where} of {world} (step metrics: {dict(totals)})")


@contextlib.contextmanager
def at_step(stage: str, step: int) -> Iterator[None]:
    """Name the loop's step in a :class:`NonFiniteLossError` raised inside (the policy knows
    the rank, the loop the step)."""
    try:
        yield
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{stage} step {step}: {err}") from err


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
