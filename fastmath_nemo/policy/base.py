"""The Policy seam: a trainable model that scores tokens and takes optimizer steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from fastmath_nemo.batch import Batch

# (logprobs[B, T], batch) -> (scalar loss, metrics). Pure; see fastmath_nemo/algorithms/losses.py.
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Policy(Protocol):
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """Per-token logprobs [B, T] (see Batch for alignment), without gradients."""
        ...

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step: accumulate gradients over ``micro_batches``, clip, step, schedule."""
        ...

    def snapshot_reference(self) -> None:
        """Keep the current weights, off the accelerator, as the KL reference (``grpo.beta > 0``)."""
        ...

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """Per-token logprobs [B, T] under the snapshot's weights, without gradients; the
        training weights (and optimizer state) are exactly as before the call."""
        ...

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Weights under Hugging Face names, one tensor at a time."""
        ...

    def save(self, directory: Path) -> None:
        ...

    def load(self, directory: Path) -> None:
        ...
