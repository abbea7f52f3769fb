"""Micro-batches of an optimizer step: how its rows are split, and their results merged back.

Shapes: a step batch has ``B`` rows of ``T`` tokens; a micro-batch ``i`` has ``b_i`` of them,
trimmed to its own longest row ``w_i <= T`` (rows are right-padded, see
:mod:`fastmath_nemo.batching.batch`).

Two ways to split (:class:`MicroBatching`, from ``policy.micro_batch_rows`` and
``policy.max_tokens_per_micro_batch``):

- by rows: consecutive runs of ``rows`` rows, in the batch's order;
- by a token budget: rows sorted by length (longest first), each micro-batch filled while
  ``b_i * w_i <= max_tokens``; a row longer than the budget is a micro-batch alone. Memory
  is then bounded by the budget, not by the step's longest row times its row count.

One :class:`MicroBatching` per run, built from the config by :meth:`MicroBatching.of`: the
policy holds it (``Policy.micro_batching``), splits its ``logprobs`` passes with it, and the
stage loops split each step's rows with the same one.

How the rows are split must not change the gradient: the loop computes the step's totals
over every micro-batch of every data-parallel rank (:mod:`fastmath_nemo.batching.step_totals`),
binds them into the loss, and the policy sums the micro-batch losses (see
:mod:`fastmath_nemo.algorithms.losses` for the contract).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from fastmath_nemo.batching.batch import Batch
from fastmath_nemo.config.schema import PolicyConfig


@dataclass(frozen=True)
class MicroBatching:
    """How one step's rows are split into micro-batches.

    rows: rows per micro-batch when ``max_tokens`` is None.
    max_tokens: token budget of one micro-batch (rows x padded width), or None.
    """

    rows: int = 16
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.rows <= 0:
            raise ValueError(f"rows must be positive, got {self.rows}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")

    @classmethod
    def of(cls, cfg: PolicyConfig) -> "MicroBatching":
        """``policy.micro_batch_rows`` / ``policy.max_tokens_per_micro_batch``: the run's split."""
        return cls(rows=cfg.micro_batch_rows, max_tokens=cfg.max_tokens_per_micro_batch)


def row_lengths(batch: Batch) -> list[int]:
    """Tokens up to and including the last non-padding one, per row: ``[B]`` ints (at least 1,
    so that a row of padding alone still has a width)."""
    real = batch.document_ids > 0  # [B, T]
    positions = torch.arange(1, batch.width + 1, device=real.device).expand_as(real)
    last = torch.where(real, positions, torch.zeros_like(positions)).max(dim=-1).values  # [B]
    return [max(int(n), 1) for n in last.tolist()]


def plan_micro_batches(lengths: Sequence[int], spec: MicroBatching) -> list[list[int]]:
    """Row indices of each micro-batch; every index in ``range(len(lengths))`` exactly once.

    By rows: ``[[0..rows-1], [rows..2 rows-1], ...]``. By token budget: indices sorted by
    length, longest first (ties in index order), so a micro-batch's first row is its widest
    and ``len(group) * lengths[group[0]] <= max_tokens`` unless the group is one row.
    """
    n = len(lengths)
    if spec.max_tokens is None:
        return [list(range(i, min(i + spec.rows, n))) for i in range(0, n, spec.rows)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        if current and (len(current) + 1) * width > spec.max_tokens:
            groups.append(current)
            current = []
        if not current:
            width = max(int(lengths[i]), 1)
        current.append(i)
    if current:
        groups.append(current)
    return groups


def trimmed(batch: Batch, width: int) -> Batch:
    """The first ``width`` columns of every ``[B, T]`` field (``[B]`` fields unchanged)."""
    picked = {
        f.name: (v[:, :width] if isinstance(v := getattr(batch, f.name), torch.Tensor) and v.dim() == 2 else v)
        for f in fields(batch)
    }
    return Batch(**picked)


def split_batch(batch: Batch, spec: MicroBatching) -> tuple[list[Batch], list[list[int]]]:
    """``batch`` as micro-batches (each trimmed to its longest row) and their row indices."""
    lengths = row_lengths(batch)
    groups = plan_micro_batches(lengths, spec)
    micro = [
        trimmed(batch.select(torch.tensor(g, dtype=torch.long)), max(lengths[i] for i in g)) for g in groups
    ]
    return micro, groups


def micro_batches(batch: Batch, spec: MicroBatching) -> list[Batch]:
    """The micro-batches of one optimizer step (see :func:`split_batch`)."""
    return split_batch(batch, spec)[0]


def merge_rows(parts: Sequence[torch.Tensor], micro: Sequence[Batch], groups: Sequence[Sequence[int]],
               rows: int, width: int) -> torch.Tensor:
    """Put per-micro-batch results back in the batch's row order.

    parts[i]: ``[>= b_i, >= w_i]`` for ``micro[i]`` of ``[b_i, w_i]`` (a backend may have
    padded rows or columns, which are dropped); returns ``[rows, width]``, zero beyond each
    micro-batch's width (padding positions).
    """
    out = torch.zeros(rows, width, dtype=parts[0].dtype, device=parts[0].device)
    for part, m, group in zip(parts, micro, groups):
        index = torch.tensor(list(group), dtype=torch.long, device=out.device)
        out[index, : m.width] = part[: len(group), : m.width].to(out.device)
    return out
