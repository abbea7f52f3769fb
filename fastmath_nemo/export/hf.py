"""``export.format=hf``: a Hugging Face folder that transformers and vLLM load."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastmath_nemo.export.source import stored_dtype


def export_hf(source: Path, target: Path, dtype: torch.dtype | None = None) -> None:
    """Load ``source`` with transformers and save it into ``target`` (safetensors, sharded with
    an index as ``save_pretrained`` does, ``config.json``, ``generation_config.json``, tokenizer
    and chat template), as a user of transformers would. ``dtype`` None keeps the stored tensors' dtype,
    so the weights come out bit-exact."""
    dtype = dtype or stored_dtype(source)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, local_files_only=True)
    model.save_pretrained(str(target), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(target))


def export_hf_metadata(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Everything of a HF folder but the weights (``config.json`` with ``dtype``, tokenizer),
    saved beside a megatron checkpoint so that the model and its tokenizer can be rebuilt."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    config.dtype = dtype
    config.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(target))
