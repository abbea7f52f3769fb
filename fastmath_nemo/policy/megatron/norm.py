"""The RMSNorm of the local (non-Transformer-Engine) layer spec, with sequence parallelism."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built the way megatron-core builds its norms, usable with
    ``sequence_parallel=True``.

    megatron-core's local spec builds norms through ``WrappedTorchNorm``, which refuses
    sequence parallelism, and its alternative (apex's ``FusedLayerNorm``) has no PyPI wheel.
    RMSNorm works token by token, so under sequence parallelism each tensor-parallel rank
    simply normalises its slice of the sequence; only the weight's gradient, computed on that
    slice, must be summed over the tensor-parallel ranks. Marking the weight
    ``sequence_parallel`` has megatron's ``finalize_model_grads`` do that sum (as it does for
    Transformer Engine's norms). Without sequence parallelism this is ``WrappedTorchNorm``'s
    ``torch.nn.RMSNorm``: same parameter (``weight``), same numerics.

    Input ``[s, b, h]`` (``s`` this rank's sequence slice under sequence parallelism), output alike.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError(f"SequenceParallelRMSNorm is a plain RMSNorm, not {config.normalization} "
                             f"(zero_centered_gamma={config.layernorm_zero_centered_gamma})")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]
