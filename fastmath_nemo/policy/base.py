"""The Policy seam: a trainable model that scores tokens and takes optimizer steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from fastmath_nemo.batching.batch import Batch
from fastmath_nemo.batching.micro_batches import MicroBatching
from fastmath_nemo.checkpoint.manager import PendingWrite
from fastmath_nemo.config.schema import OptimizerConfig

# (logprobs[B, T], batch) -> (scalar loss, metrics). Pure; see fastmath_nemo/algorithms/losses.py.
# The loss is the micro-batch's share of the step's loss (its sum over micro-batches and
# data-parallel ranks is the step's loss), metrics likewise (keys ending in _max: maxima).
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Policy(Protocol):
    """What the stage loops (``algorithms/sft.py``, ``algorithms/grpo.py``) and the checkpoint
    manager use; ``TorchPolicy`` and ``MegatronPolicy`` implement it."""

    # True when every rank holds a shard of the weights and must take part in save() (megatron);
    # False when rank 0 holds all of them (CheckpointManager then saves on rank 0 alone).
    saves_collectively: bool
    # How a step's rows are split into micro-batches (by rows or by a token budget): the policy's
    # logprobs passes and the stage loops' training steps use this one (MicroBatching.of(cfg.policy)).
    micro_batching: MicroBatching

    def setup_optimizer(self, cfg: OptimizerConfig, total_steps: int) -> None:
        """AdamW and the warmup + cosine LR schedule over ``total_steps`` optimizer steps;
        before ``train_step`` and before ``load`` (which restores their state)."""
        ...

    def logprobs(self, batch: Batch) -> torch.Tensor:
        """Per-token logprobs [B, T] (see Batch for alignment), without gradients, in the
        batch's row order, computed in the policy's ``micro_batching``."""
        ...

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on this rank's ``micro_batches``: clip, step, schedule.

        The step contract (``algorithms/losses.py``): ``loss_fn`` returns each micro-batch's
        share of the step's loss, normalised by totals over the whole step (bound by the
        caller, ``batching.step_totals.step_totals``). The gradient is the SUM of the shares over
        micro-batches and data-parallel ranks: implementations cancel their framework's
        averaging (DDP's mean over ranks, megatron's over ranks and micro-batches), so the
        step is the same however its rows are split. Returns the loss metrics summed the same
        way (``*_max``: maxima over the step), i.e. the whole step's values on every rank,
        plus ``lr`` and ``grad_norm``.
        """
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

    def save(self, directory: Path, extra_state: dict[str, Any] | None = None, weights_only: bool = False,
             *, asynchronous: bool = False) -> PendingWrite | None:
        """A resumable checkpoint: the weights, optimizer and scheduler state in the backend's
        own form (the PyTorch backend: a Hugging Face folder plus ``trainer_state.pt``; megatron:
        a distributed checkpoint every rank writes its shards of), and the loop's
        ``extra_state`` (e.g. ``{"step": 12}``). Collective when ``saves_collectively``.
        ``weights_only``: a Hugging Face folder and the loop state, no optimizer state (for models
        that are only loaded: ``final/``, the GRPO stage's kept candidates). ``asynchronous``:
        a backend that can write in the background returns a :class:`PendingWrite` (megatron);
        otherwise the checkpoint is written when this returns (None)."""
        ...

    def load(self, directory: Path) -> dict[str, Any]:
        """Restore what ``save`` wrote (optimizer state when set up); returns its ``extra_state``."""
        ...
