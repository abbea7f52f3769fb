"""Per-token logprobs from final hidden states without materialising ``[N, V]`` logits.

``chunked_token_logprobs(hidden, weight, targets, temperature, chunk_tokens)`` returns
``log softmax(hidden @ weight.T / temperature)[n, targets[n]]`` for every token ``n``.

Memory (N tokens, H hidden, V vocabulary, c = ``chunk_tokens``):

- forward: the ``[c, V]`` fp32 logits of one chunk and their log-softmax, freed
  before the next chunk; nothing of size ``N x V`` is kept for the backward, only ``hidden``
  (``[N, H]``, which autograd holds anyway) and references to ``weight`` and ``targets``.
- backward: each chunk's logits are recomputed, turned into ``d logprob / d logits`` in place
  (``(onehot - softmax) / temperature``, two ``[c, V]`` fp32 buffers at the peak plus the
  cast to the matmul dtype), and contracted at once into ``grad_hidden[chunk]`` (``[c, H]``) and the
  fp32 accumulator ``grad_weight`` (``[V, H]``, the same size as the weight's own gradient).

At V = 152,064 and c = 1,024 (the default) a chunk costs 0.62 GB of fp32 logits (c = 4,096: 2.5 GB); one 16,384-token row
unchunked would cost 10 GB, plus the log-softmax copy and the stored activations.

Mixed precision mirrors ``lm_head`` under autocast: the matmuls run in ``matmul_dtype`` (the
autocast dtype when autocast is on, else the inputs' dtype) and the softmax always in fp32.
This module imports only torch (it must not pull in megatron / vLLM), so both backends can use it.
"""

from __future__ import annotations

from typing import Any

import torch


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``torch.nn.functional.linear(hidden, weight)`` would compute in right now."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.result_type(hidden, weight)


def _softmax_dtype(matmul_dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (finite-difference checks need the full precision)."""
    return torch.promote_types(torch.float32, matmul_dtype)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """[c, H] x [V, H] (``w`` already in the matmul dtype) -> fp32 [c, V] logits / temperature,
    a fresh tensor that is safe to modify in place."""
    logits = (h.to(w.dtype) @ w.T).to(_softmax_dtype(w.dtype))
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """See ``chunked_token_logprobs``. Runs with autocast off and casts explicitly, so forward
    and the recomputation in backward use the same dtypes whatever the caller's context."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        chunk_tokens: int,
        matmul_dtype: torch.dtype,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=_softmax_dtype(matmul_dtype), device=hidden.device)
        w = weight.to(matmul_dtype)  # cast once (a bf16 copy of [V, H]), not per chunk
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_tokens):
                end = min(start + chunk_tokens, n)
                logits = _chunk_logits(hidden[start:end], w, temperature)
                # log_softmax, as the whole-logits path computes it (same rounding, row by row)
                logprobs = torch.log_softmax(logits, dim=-1)
                del logits
                out[start:end] = logprobs.gather(1, targets[start:end, None]).squeeze(1)
                del logprobs
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk_tokens, ctx.matmul_dtype = temperature, chunk_tokens, matmul_dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, targets = ctx.saved_tensors
        temperature, chunk_tokens, dtype = ctx.temperature, ctx.chunk_tokens, ctx.matmul_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # fp32 accumulation over chunks, whatever the matmul dtype: the sum of many bf16
        # partial products would otherwise round at every chunk.
        acc = _softmax_dtype(dtype)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        w = weight.to(dtype)
        n = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_tokens):
                end = min(start + chunk_tokens, n)
                h = hidden[start:end].to(dtype)
                logits = _chunk_logits(h, w, temperature)
                # d logprob[n] / d logits[n, v] = (onehot(target) - softmax)[v] / temperature,
                # built in one buffer: p = exp(log_softmax), then -p, then +1 at the target.
                grad_logits = torch.log_softmax(logits, dim=-1)
                del logits
                grad_logits.exp_().neg_()
                grad_logits.scatter_add_(
                    1, targets[start:end, None], torch.ones(end - start, 1, dtype=grad_logits.dtype, device=grad_logits.device)
                )
                grad_logits.mul_(grad_out[start:end, None].to(grad_logits.dtype) / temperature)
                g = grad_logits.to(dtype)
                del grad_logits
                if grad_hidden is not None:
                    grad_hidden[start:end] = (g @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (g.T @ h).to(acc)
                # in fp32 ``g`` is the chunk's gradient buffer itself: drop it before the next
                # chunk allocates its logits, or three [c, V] buffers are alive at the peak
                del g, h
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            None,
            None,
            None,
            None,
        )


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Logprob of each target under ``softmax(hidden @ weight.T / temperature)``, chunk by chunk.

    hidden:  [N, H] final hidden states (after the final norm), any float dtype.
    weight:  [V, H] output head weight (``lm_head.weight``; tied or not, gradients flow to it).
    targets: LongTensor[N] token whose logprob is wanted at each position, in ``[0, V)``.
    temperature: logits are divided by it before the softmax (the sampler's distribution).
    chunk_tokens: tokens per chunk (> 0); the last chunk may be shorter.
    Returns FloatTensor[N] (fp32), differentiable wrt ``hidden`` and ``weight``.

    Under autocast the two matmuls run in the autocast dtype, as ``lm_head`` would; the
    log-softmax is always fp32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out: torch.Tensor = _ChunkedTokenLogprobs.apply(
        hidden, weight, targets.long(), float(temperature), int(chunk_tokens), _matmul_dtype(hidden, weight)
    )
    return out
