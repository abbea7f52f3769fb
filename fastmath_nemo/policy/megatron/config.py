"""Hugging Face config -> megatron-core ``TransformerConfig`` and rotary settings (the layer
spec, Transformer Engine and FP8 are ``layer_spec.py``'s).

Supported: Qwen2 (QKV bias), Qwen3 (QK RMSNorm, ``head_dim`` may differ from hidden/heads) and
Llama (no biases). All three are pre-norm RMSNorm decoders with SwiGLU MLPs, GQA and RoPE
(half-split, not interleaved, as megatron's default). Anything the megatron model would compute
differently (other activations, sliding windows, biases megatron cannot place, RoPE scalings
``GPTModel`` cannot express) raises ``ValueError`` instead of building a silently wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from fastmath_nemo.policy.megatron.parallel import check_layout

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
# GPTModel's llama3 RoPE scaling hard-codes these (RotaryEmbedding._apply_scaling defaults).
_MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class RopeSettings:
    """RoPE as ``GPTModel`` takes it: ``rotary_base``, optional llama3 scaling factor
    (``rope_scaling=True, rope_scaling_factor``) or linear position interpolation
    (``seq_len_interpolation_factor``)."""

    base: float
    llama3_factor: float | None = None
    linear_factor: float | None = None


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """transformers >= 5 keeps theta and scaling in ``rope_parameters``; 4.x in
    ``rope_theta`` / ``rope_scaling``. Returns one dict with ``rope_type`` and ``rope_theta``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if not params and scaling:
        params = dict(scaling)
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def rope_settings(hf_config: Any) -> RopeSettings:
    """The RoPE of ``hf_config`` as ``GPTModel`` arguments; ValueError if it has none."""
    params = _rope_parameters(hf_config)
    base, kind = float(params["rope_theta"]), params["rope_type"]
    if kind == "default":
        return RopeSettings(base)
    if kind == "linear":
        # HF divides inv_freq by the factor; megatron divides positions by it: the same angles.
        return RopeSettings(base, linear_factor=float(params["factor"]))
    if kind == "llama3":
        fixed = {k: float(params.get(k, v)) for k, v in _MCORE_LLAMA3.items()}
        if fixed != _MCORE_LLAMA3:
            raise ValueError(
                f"rope_type 'llama3' with {fixed} cannot be represented: megatron-core's GPTModel "
                f"fixes {_MCORE_LLAMA3} and only takes the factor"
            )
        return RopeSettings(base, llama3_factor=float(params["factor"]))
    raise ValueError(
        f"rope_type {kind!r} cannot be represented by megatron-core's GPTModel "
        "(supported: default, linear, llama3)"
    )


def head_dim(hf_config: Any) -> int:
    """Per-head width: ``head_dim`` when the config sets it (Qwen3), else hidden / heads."""
    value = getattr(hf_config, "head_dim", None)
    return int(value) if value else hf_config.hidden_size // hf_config.num_attention_heads


def _check_supported(hf_config: Any) -> None:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the megatron backend "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported (SwiGLU needs 'silu')")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
    layer_types = getattr(hf_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"only full attention layers are supported, got layer_types={layer_types}")
    # Qwen2's q/k/v biases map to add_qkv_bias; any other bias (o_proj, MLP) has no place.
    if model_type != "qwen2" and getattr(hf_config, "attention_bias", False):
        raise ValueError(f"{model_type} with attention_bias=True (o_proj bias) is not supported")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    rope_settings(hf_config)


def transformer_config_from_hf(
    hf_config: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute: bool = False,
) -> TransformerConfig:
    """A ``TransformerConfig`` computing what the HF model computes (dropout off, no fusions).

    Raises ValueError for unsupported models and for layouts ``check_layout`` rejects.
    Fusions are off because their kernels are CUDA/apex-only or change numerics; ``recompute``
    selects full activation recompute of every layer (``uniform``, one layer per unit).
    Embedding tying is a ``GPTModel`` argument (see ``model.build_gpt_model``).
    """
    _check_supported(hf_config)
    check_layout(
        hf_config.num_attention_heads, hf_config.num_key_value_heads, hf_config.num_hidden_layers, tp * pp * cp, tp, pp,
        cp,
    )
    recompute_kwargs: dict[str, Any] = {}
    if recompute:
        recompute_kwargs = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=hf_config.model_type == "qwen2",
        qk_layernorm=hf_config.model_type == "qwen3",
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # CPU runs cannot allocate on a GPU; on GPU megatron initialises shards in place.
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **recompute_kwargs,
    )
