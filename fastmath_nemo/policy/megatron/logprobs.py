"""Per-token logprobs from the final hidden states, a chunk of tokens at a time, vocab-parallel.

The output layer's logits of a whole micro-batch are ``[N, V / tp]`` fp32 for ``N = B x T``
tokens: 16,384 tokens at V = 152,064 and TP = 4 are 10 GB, before the softmax's copies and
the backward. Here the logits exist for one chunk of ``C`` tokens at a time:

- forward: per chunk, ``logits = hidden_c @ W_local^T`` (the output layer's matmul, in the
  parameter dtype), ``/ temperature`` in fp32, vocabulary padding masked; the max and then
  the sum of exponentials and the target's logit are all-reduced over TP ranks, as megatron's
  ``vocab_parallel_cross_entropy`` does. Only ``log Z`` (one fp32 per token) is kept.
- backward: per chunk the logits are recomputed (one more matmul) and
  ``d logprob / d logits = onehot(target) - softmax``; the chunk's gradients wrt its hidden
  states and the weight shard are formed and the logits dropped.

Peak memory of the logprobs is ``O(C x V / tp)`` instead of ``O(N x V / tp)``, plus the fp32
weight-gradient accumulator ``[V / tp, H]`` (the size of the shard's gradient itself).

The gradient wrt the hidden states is a partial sum (this rank's vocabulary only): as in
``ColumnParallelLinear``, it is all-reduced over TP by ``copy_to_tensor_model_parallel_region``'s
backward, or, under sequence parallelism, reduce-scattered by the backward of the all-gather
that assembles the sequence-sharded hidden states.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _scaled_logits(hidden: Tensor, weight: Tensor, temperature: float, valid: int) -> Tensor:
    """fp32 ``[n, V_local]`` logits of ``hidden`` [n, H] / temperature; columns from ``valid``
    on (vocabulary padding) are -inf."""
    scaled = torch.matmul(hidden, weight.t()).float() / temperature
    if valid < scaled.size(-1):
        scaled[:, valid:] = float("-inf")
    return scaled


class _ChunkedVocabParallelLogprobs(torch.autograd.Function):
    """``log softmax(hidden @ W^T / temperature)[target]`` per token over the TP-sharded
    vocabulary, ``C`` tokens at a time, recomputing the chunk's logits in the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
        vocab_size: int, chunk: int, group: dist.ProcessGroup | None,
    ) -> Tensor:
        """hidden [N, H], weight [V_local, H] (this rank's rows of the padded vocabulary),
        targets [N] (global vocabulary ids) -> logprobs [N] fp32."""
        tp = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        local = weight.size(0)
        start = rank * local
        valid = max(0, min(local, vocab_size - start))
        n = hidden.size(0)
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_z = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            scaled = _scaled_logits(hidden[s:e], weight, temperature, valid)
            top = scaled.max(dim=-1).values
            if tp > 1:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            scaled -= top[:, None]
            target = targets[s:e] - start
            mine = (target >= 0) & (target < local)
            # where another rank holds the target, the clamped index may hit -inf padding
            picked = torch.where(mine, scaled.gather(1, target.clamp(0, local - 1)[:, None]).squeeze(1), 0.0)
            # one all-reduce for both sums: [sum exp, target's logit] per token
            sums = torch.stack([scaled.exp_().sum(dim=-1), picked])
            if tp > 1:
                dist.all_reduce(sums, group=group)
            log_sum = sums[0].log()
            logprobs[s:e] = sums[1] - log_sum
            log_z[s:e] = top + log_sum
            del scaled
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.settings = (temperature, chunk, start, valid)
        return logprobs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """grad [N] -> (grad hidden [N, H] partial over this rank's vocabulary, grad weight
        [V_local, H], None ...)."""
        hidden, weight, targets, log_z = ctx.saved_tensors
        temperature, chunk, start, valid = ctx.settings
        local = weight.size(0)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # accumulated in fp32 over chunks (bf16 sums of many chunks would lose precision)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad = grad.float()
        for s in range(0, hidden.size(0), chunk):
            e = min(hidden.size(0), s + chunk)
            h = hidden[s:e]
            scaled = _scaled_logits(h, weight, temperature, valid)
            # d logprob / d scaled = onehot(target) - softmax; times the upstream gradient
            d_scaled = scaled.sub_(log_z[s:e, None]).exp_().mul_(-grad[s:e, None])
            target = targets[s:e] - start
            mine = (target >= 0) & (target < local)
            rows = mine.nonzero().squeeze(1)
            d_scaled[rows, target[rows]] += grad[s:e][rows]
            d_logits = d_scaled.div_(temperature).to(hidden.dtype)
            if want_hidden:
                grad_hidden[s:e] = torch.matmul(d_logits, weight)
            if want_weight:
                grad_weight += torch.matmul(d_logits.t(), h).float()
            del scaled, d_scaled, d_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    vocab_size: int,
    temperature: float,
    chunk_tokens: int,
    sequence_parallel: bool = False,
) -> Tensor:
    """Vocab-parallel next-token logprobs from the last stage's final hidden states.

    hidden:  [S, B, H] after the final norm, sequence first as megatron keeps it; under
             sequence parallelism this TP rank's [S / tp, B, H]
    weight:  [V_local, H] the output layer's (or tied embedding's) shard of the padded vocabulary
    targets: [S, B] the token each position predicts (any valid id where none is used)
    returns  [S, B] fp32 ``log softmax(hidden @ W^T / temperature)[targets]``

    Needs megatron's model parallel state (the TP group).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if sequence_parallel:
        # all-gather the sequence; backward reduce-scatters the partial gradients
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    else:
        # identity; backward all-reduces the partial gradients (each rank's vocabulary slice)
        hidden = copy_to_tensor_model_parallel_region(hidden)
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    group = parallel_state.get_tensor_model_parallel_group()
    tp_group = group if dist.is_initialized() and dist.get_world_size(group) > 1 else None
    flat = _ChunkedVocabParallelLogprobs.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), temperature, vocab_size, chunk_tokens,
        tp_group,
    )
    return flat.view(targets.shape)
