"""Tiny Hugging Face models (no downloads) shared by the megatron tests and their torchrun worker."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config, Qwen3Config

STD = 0.1
MODEL_TYPES = ("qwen2", "qwen3", "llama")
_COMMON = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=96, max_position_embeddings=128, rms_norm_eps=1e-6,
)


def tiny_hf_config(model_type: str, **overrides):
    """Qwen2: QKV bias, untied. Qwen3: QK norm, tied, head_dim 32 != 64 / 4. Llama: 4 layers, untied."""
    if model_type == "qwen2":
        cfg = Qwen2Config(**_COMMON, num_hidden_layers=2, tie_word_embeddings=False, rope_theta=10000.0)
    elif model_type == "qwen3":
        cfg = Qwen3Config(**_COMMON, num_hidden_layers=2, tie_word_embeddings=True, head_dim=32, rope_theta=1e6)
    elif model_type == "llama":
        cfg = LlamaConfig(**_COMMON, num_hidden_layers=4, tie_word_embeddings=False, rope_theta=500000.0)
    else:
        raise ValueError(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_hf_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """fp32, eval mode; weights ~ N(0, 0.2) and norm scales ~ N(1, 0.2), so that every tensor
    (norms and biases included) changes the logits and a misplaced one shows."""
    cfg = tiny_hf_config(model_type, **overrides)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            mean = 1.0 if "norm" in name else 0.0
            param.copy_(mean + STD * torch.randn(param.shape, generator=gen))
    return model.eval()


def packed_row(seq_len: int, first_doc: int = 5) -> torch.Tensor:
    """document_ids [1, seq_len] of a row packing two documents (1, then 2)."""
    ids = torch.full((1, seq_len), 2, dtype=torch.long)
    ids[0, :first_doc] = 1
    return ids
