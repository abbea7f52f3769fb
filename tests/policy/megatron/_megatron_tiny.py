"""Tiny Hugging Face models (no downloads) shared by the megatron tests and their torchrun worker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config, Qwen3Config

from fastmath_nemo.batching.batch import Batch, batch_from_sequences
from fastmath_nemo.config.schema import OptimizerConfig

# eps 1e-6: Adam's first step is lr * g / (|g| + eps), so where a gradient is ~0 (Qwen3's
# QK norm leaves q/k projections a direction without gradient) rounding noise in g alone
# would decide the update; a larger eps keeps those elements still on both sides.
OPTIMIZER = OptimizerConfig(lr=1e-3, weight_decay=0.1, eps=1e-6, max_grad_norm=0.5, warmup_ratio=0.0)

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


def sft_rows() -> tuple[Batch, list[Batch]]:
    """Four rows for one SFT step, and the same rows as two micro-batches of two. Width 13
    (odd: sequence parallelism pads it to a multiple of TP); three prompt tokens per row."""
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (13, 9, 11, 12)]
    batch = batch_from_sequences(seqs, [[0] * 3 + [1] * (len(s) - 3) for s in seqs], pad_id=0)
    return batch, [batch.select(slice(0, 2)), batch.select(slice(2, 4))]


def packed_rows() -> Batch:
    """Two rows of width 14, each packing two documents (positions restart at 0), the second
    row ending in one pad."""
    gen = torch.Generator().manual_seed(1)
    document_ids = torch.tensor([[1] * 6 + [2] * 8, [1] * 9 + [2] * 4 + [0]])
    position_ids = torch.tensor([list(range(6)) + list(range(8)), list(range(9)) + list(range(4)) + [0]])
    input_ids = torch.randint(1, 96, (2, 14), generator=gen) * (document_ids > 0)
    return Batch(input_ids=input_ids, position_ids=position_ids, document_ids=document_ids,
                 loss_mask=(document_ids > 0).float())


def max_abs_diff(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> float:
    """Largest elementwise ``|ours[k] - theirs[k]|`` over the names in ``theirs`` (fp32, CPU)."""
    return max(float((ours[k].float().cpu() - theirs[k].float().cpu()).abs().max()) for k in theirs)


def weight_diff(policy: Any, reference: Any) -> float:
    """:func:`max_abs_diff` of a policy's exported (HF-named) weights and a TorchPolicy's."""
    return max_abs_diff(dict(policy.export_weights()), dict(reference.model.named_parameters()))


def logprob_diff(policy: Any, reference: Any, batch: Batch) -> float:
    """Largest |logprob difference| of two policies over ``batch``'s real tokens (padding
    attends differently in the two models and is never a target)."""
    real = batch.document_ids > 0
    return float((policy.logprobs(batch) - reference.logprobs(batch))[real].abs().max())
