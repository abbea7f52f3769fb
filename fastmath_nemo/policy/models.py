"""Building and loading the causal LM behind the PyTorch policy.

A real model is any Hugging Face folder (config, safetensors, tokenizer with a chat
template). The embedded default is a tiny Qwen2 or Llama built from a transformers
config with random weights: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase, Qwen2Config

from fastmath_nemo.config.schema import DType, TinyModelConfig  # defined with the config

DTYPES = {d.value: getattr(torch, d.value) for d in DType}  # config name -> torch dtype


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config = Qwen2Config(**common) if cfg.architecture == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def load_pretrained(path: str | Path, dtype: str = "float32") -> PreTrainedModel:
    """Load a local Hugging Face model folder (never a hub id: ``local_files_only``).
    Training keeps float32 weights and gets bfloat16 compute through autocast."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path: {path} is not a local model folder")
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[dtype], attn_implementation="sdpa", local_files_only=True
    )
