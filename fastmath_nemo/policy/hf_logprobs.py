"""``TokenLogprobs``: a transformers causal LM as an ``nn.Module`` whose forward returns token
logprobs, so the whole computation (decoder, output head, log-softmax) is one module call.

Why a module: under torchrun, ``TorchPolicy`` wraps it in ``DistributedDataParallel``. DDP only
all-reduces gradients of a forward that went through its own ``forward``; calling
``model.model(...)`` for the hidden states and then the output head by hand would bypass it.
The wrapper owns the LM as a submodule, so DDP sees exactly the LM's parameters.

Two paths (``policy.logprob_chunk_tokens``):

- ``chunk_tokens > 0``: the decoder's final hidden states ``[B, T, H]`` go through
  ``chunked_token_logprobs`` with ``lm_head.weight`` (the embedding matrix itself when tied),
  holding at most ``chunk_tokens x V`` logits at a time, forward and backward.
- ``chunk_tokens == 0``: the whole ``[B, T, V]`` logits, fp32 copies and log-softmax (the old
  path, kept as the benchmark baseline).

Supported: models whose logits are exactly ``lm_head(decoder(...).last_hidden_state)`` with a
bias-free linear head (Qwen2/2.5/3, Llama, Mistral); anything else is refused at construction.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from fastmath_nemo.policy.chunked_logprobs import chunked_token_logprobs

# Heads whose logits are not a plain linear map of the last hidden state.
_UNSUPPORTED_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class TokenLogprobs(torch.nn.Module):
    """forward(input_ids [B, T], position_ids [B, T], attention_mask) -> fp32 [B, T - 1]
    (fp64 for an fp64 model):
    ``out[b, t] = log p(input_ids[b, t + 1] | input_ids[b, :t + 1]) `` under
    ``softmax(logits / temperature)``."""

    def __init__(self, lm: PreTrainedModel, temperature: float = 1.0, chunk_tokens: int = 1024) -> None:
        super().__init__()
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0 (0: whole rows), got {chunk_tokens}")
        self.lm = lm
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        if chunk_tokens > 0:
            head = lm.get_output_embeddings()
            if not isinstance(head, torch.nn.Linear) or head.bias is not None:
                raise ValueError(f"{type(lm).__name__}: chunked logprobs need a bias-free nn.Linear output head "
                                 "(set policy.logprob_chunk_tokens=0)")
            bad = [k for k in _UNSUPPORTED_CONFIG_KEYS if getattr(lm.config, k, None) not in (None, 1.0)]
            if bad:
                raise ValueError(f"{type(lm).__name__}: logits are rescaled ({bad}); set policy.logprob_chunk_tokens=0")

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        targets = input_ids[:, 1:]
        if self.chunk_tokens == 0:
            logits = self.lm(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
            ).logits[:, :-1]
            # fp32 (fp64 for an fp64 model), as chunked_token_logprobs
            logits = logits.to(torch.promote_types(torch.float32, logits.dtype))
            logprobs = torch.log_softmax(logits / self.temperature, dim=-1)
            return logprobs.gather(-1, targets[..., None]).squeeze(-1)
        hidden = self.lm.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state[:, :-1]  # [B, T - 1, H]
        b, t1, h = hidden.shape
        flat = chunked_token_logprobs(
            hidden.reshape(b * t1, h),
            self.lm.get_output_embeddings().weight,
            targets.reshape(b * t1),
            temperature=self.temperature,
            chunk_tokens=self.chunk_tokens,
        )
        return flat.view(b, t1)
