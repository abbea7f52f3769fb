"""The totals of one optimizer step (the losses' denominators) and the step's metrics."""

from __future__ import annotations

import torch
from _batches import batch_of_lengths as _batch

from fastmath_nemo.batching.micro_batches import MicroBatching, split_batch
from fastmath_nemo.batching.step_totals import StepTotals, reduce_step_metrics, step_totals


def test_step_totals_count_the_whole_step() -> None:
    batch = _batch([6, 2, 9, 5])  # targets: 4 + 0 + 7 + 3 = 14; the 2-token row has none
    micro, _ = split_batch(batch, MicroBatching(max_tokens=10))
    totals = step_totals(micro)  # one process: no data-parallel peers to add
    assert totals == StepTotals(target_tokens=14.0, sequences=3.0, rows=4.0, longest=9)
    assert totals == StepTotals.of(batch.loss_mask)


def test_reduce_step_metrics_sums_shares_and_maxes_maxima() -> None:
    got = reduce_step_metrics([{"loss": torch.tensor(0.25), "ratio_max": torch.tensor(1.5)},
                               {"loss": torch.tensor(0.5), "ratio_max": torch.tensor(1.25)}])
    assert got == {"loss": 0.75, "ratio_max": 1.5}
