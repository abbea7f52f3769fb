"""The totals of one optimizer step that normalise its loss, and the step's metrics.

An optimizer step is ``M_r`` micro-batches on each data-parallel rank ``r``. The loop computes
:func:`step_totals` over all of them (a collective) and binds them into the loss, so each
micro-batch's loss is its share of the step's loss (the contract in
:mod:`fastmath_nemo.algorithms.losses`); the policy sums the shares and reduces the metrics
with :func:`reduce_step_metrics`. Both use torch.distributed through
:mod:`fastmath_nemo.utils.distributed` only (no megatron): the data-parallel group is whatever
the backend registered there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastmath_nemo.batching.batch import Batch
from fastmath_nemo.utils.distributed import all_reduce_data_parallel


@dataclass(frozen=True)
class StepTotals:
    """Counts over a whole optimizer step (every micro-batch on every data-parallel rank),
    the denominators of every loss aggregation.

    target_tokens: ``sum_{b,t} m[b, t]``, target tokens (token-mean's denominator).
    sequences: rows with at least one target (seq-mean-token-mean's).
    rows: all rows, with or without targets (Dr.GRPO's ``B``; padding rows a backend adds
        are not rows of the step).
    longest: the widest micro-batch in tokens (Dr.GRPO's ``T`` when no norm_length is set).
    """

    target_tokens: float
    sequences: float
    rows: float
    longest: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> "StepTotals":
        """The totals of one ``mask[B, T]`` alone (local normalisation)."""
        rows, width = mask.shape
        return cls(
            target_tokens=float(mask.float().sum()),
            sequences=float((mask != 0).any(dim=-1).sum()),
            rows=float(rows),
            longest=int(width),
        )


def step_totals(micro: Sequence[Batch]) -> StepTotals:
    """Totals of one optimizer step: this rank's micro-batches, summed (``longest``: max)
    over the data-parallel ranks. Every data-parallel rank must call it (a collective)."""
    local = [StepTotals.of(m.loss_mask) for m in micro]
    sums = torch.tensor(
        [[t.target_tokens, t.sequences, t.rows] for t in local] or [[0.0, 0.0, 0.0]], dtype=torch.float64
    ).sum(dim=0)
    longest = torch.tensor([max((t.longest for t in local), default=0)], dtype=torch.float64)
    sums = all_reduce_data_parallel(sums, "sum")
    longest = all_reduce_data_parallel(longest, "max")
    return StepTotals(
        target_tokens=float(sums[0]), sequences=float(sums[1]), rows=float(sums[2]), longest=int(longest[0])
    )


def reduce_step_metrics(per_micro: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Step metrics from each micro-batch's metrics (0-d tensors): summed over micro-batches
    and data-parallel ranks, except keys ending in ``_max``, which are maxima.

    With step totals bound into the loss every metric is a share of the step's value (see
    :mod:`fastmath_nemo.algorithms.losses`), so the sum is that value. A collective: every
    data-parallel rank calls it, with the same keys.
    """
    keys = sorted({k for m in per_micro for k in m})
    maxima = [k for k in keys if k.endswith("_max")]
    sums = [k for k in keys if not k.endswith("_max")]

    def local(key: str, reduce_max: bool) -> float:
        values = [float(m[key]) for m in per_micro if key in m]
        return max(values) if reduce_max else sum(values)

    summed = all_reduce_data_parallel(torch.tensor([local(k, False) for k in sums], dtype=torch.float64), "sum")
    maxed = all_reduce_data_parallel(torch.tensor([local(k, True) for k in maxima], dtype=torch.float64), "max")
    return {**dict(zip(sums, summed.tolist())), **dict(zip(maxima, maxed.tolist()))}
