"""Context parallelism for the SDPA layer spec: each rank holds a slice of every row's tokens.

Layout (megatron's load-balanced one, which its rotary embedding assumes): a row of ``T``
tokens is cut into ``2 * cp`` chunks of ``T / (2 cp)``; CP rank ``r`` holds chunks ``r`` and
``2 cp - 1 - r``, so under a causal mask every rank has the same amount of attention work.

Attention all-gathers keys and values over the CP ranks (the approach of Llama 3's training,
not a ring): every rank attends its own queries to the whole row through the per-document
causal mask, ``[b, 1, T / cp, T]``. That keeps packed rows (any document mask) working;
memory for K/V grows to the full row, which is what CP sizes up to a few 10k tokens afford.

Logprobs are computed on the local tokens and all-gathered, so every CP rank evaluates the
unchanged loss function on whole rows (GRPO's per-sequence terms need them). Since each CP rank
then holds the same loss, the gather's backward keeps only the local part of the gradient;
megatron's schedule multiplies the loss by ``cp`` and its DDP averages over data x context
ranks, which together give the full-row gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from torch import Tensor


def local_positions(width: int, cp: int, rank: int, device: torch.device | None = None) -> Tensor:
    """Row positions held by CP ``rank``: chunks ``rank`` and ``2 cp - 1 - rank`` of ``2 cp``.
    ``width`` must be a multiple of ``2 cp``. Returns LongTensor[width / cp]."""
    if width % (2 * cp):
        raise ValueError(f"a row of {width} tokens cannot be split into 2 x {cp} context-parallel chunks")
    chunk = width // (2 * cp)
    starts = (rank * chunk, (2 * cp - 1 - rank) * chunk)
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


def _natural_order(width: int, cp: int, device: torch.device) -> Tensor:
    """Index into the rank-by-rank concatenation of every rank's local positions that puts
    the row back in order: ``gathered[order] == row``."""
    gathered = torch.cat([local_positions(width, cp, r) for r in range(cp)])
    return torch.argsort(gathered).to(device)


def gather_sequence(local: Tensor) -> Tensor:
    """All-gather ``[s_local, ...]`` (this rank's positions, sequence first) into the whole
    row ``[cp * s_local, ...]`` in order. Backward sums the gradients of every rank's copy
    (keys and values: each rank's queries attend to all of them)."""
    group = parallel_state.get_context_parallel_group()
    cp = group.size()
    gathered = gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True, group=group)
    return gathered.index_select(0, _natural_order(gathered.size(0), cp, gathered.device))


class _GatherReplicatedLoss(torch.autograd.Function):
    """All-gather along dim 1; backward returns this rank's slice of the gradient only (every
    rank computes the same loss from the gathered tensor, so no sum is needed)."""

    @staticmethod
    def forward(ctx, local: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        cp, rank = group.size(), group.rank()
        parts = [torch.empty_like(local) for _ in range(cp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        gathered = torch.cat(parts, dim=1)
        width = gathered.size(1)
        ctx.positions = local_positions(width, cp, rank, device=local.device)
        return gathered.index_select(1, _natural_order(width, cp, local.device))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad.index_select(1, ctx.positions), None


def gather_logprobs(local: Tensor) -> Tensor:
    """``[B, T / cp]`` per-token values of this rank's positions -> ``[B, T]`` in row order, on
    every CP rank (differentiable; see :class:`_GatherReplicatedLoss`)."""
    return _GatherReplicatedLoss.apply(local, parallel_state.get_context_parallel_group())
