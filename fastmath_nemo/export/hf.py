"""``export.format=hf``: a Hugging Face folder that transformers and vLLM load.

The tensors are copied one at a time, read with ``safe_open`` and written with the streaming
writer (``checkpoint.safetensors_stream``), cast to ``export.dtype`` when one is given: the
export of a 14B model holds one tensor, not the model (``from_pretrained`` then
``save_pretrained`` would hold all 29.5 GB). A megatron training checkpoint (no Hugging Face
weights, only ``megatron/``) is read in one process at TP=1, megatron-core resharding it, and
its tensors are gathered one at a time the same way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from fastmath_nemo.checkpoint.safetensors_stream import SafetensorsStreamWriter, TensorSpec
from fastmath_nemo.checkpoint.portable_folders import save_tokenizer
from fastmath_nemo.export.source import stored_dtype

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"]


def _source_layout(folder: Path, dtype: torch.dtype | None) -> list[TensorSpec]:
    """Every tensor of ``folder``'s safetensors (from the headers), as it will be written: in
    ``dtype``, or (None) in its own."""
    specs = []
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                if piece.get_dtype() not in _DTYPES:
                    raise ValueError(f"{file}: {name} is {piece.get_dtype()}, not a float32, bfloat16 or float16 weight")
                specs.append(TensorSpec(name, dtype or _DTYPES[piece.get_dtype()], tuple(piece.get_shape())))
    return specs


def _source_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def export_hf(source: Path, target: Path, dtype: torch.dtype | None = None) -> None:
    """``source``'s weights (a Hugging Face folder) into ``target`` one tensor at a time, with
    ``config.json``, ``generation_config.json`` where the source has one, and the tokenizer
    with its chat template. ``dtype`` None keeps each stored tensor's dtype: bit-exact (a
    megatron bf16 model's final folder keeps its fp32 norm scales)."""
    writer = SafetensorsStreamWriter(target, _source_layout(source, dtype))
    for name, tensor in _source_tensors(source):
        writer.write(name, tensor.to(dtype) if dtype is not None else tensor)
    writer.close()
    export_hf_metadata(source, target, dtype or stored_dtype(source))
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(source), local_files_only=True).save_pretrained(str(target))


def export_hf_metadata(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Everything of a HF folder but the weights (``config.json`` with ``dtype``, tokenizer),
    saved beside the weights so that the model and its tokenizer can be rebuilt."""
    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    config.dtype = dtype
    config.save_pretrained(str(target))
    save_tokenizer(AutoTokenizer.from_pretrained(str(source), local_files_only=True), target)


def export_hf_from_distributed(source: Path, target: Path, dtype: torch.dtype | None = None) -> None:
    """A megatron training checkpoint (``source/megatron``) as a Hugging Face folder: its weights
    loaded at TP=1 in this process (a world of one), gathered one tensor at a time."""
    from fastmath_nemo.config.schema import MegatronConfig
    from fastmath_nemo.policy.megatron.checkpointing import distributed_dtype, write_hf_weights
    from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    stored = distributed_dtype(source)
    try:
        policy = MegatronPolicy(source, MegatronConfig(), params_dtype=stored)
        layout = policy.hf_layout()
        if dtype is not None:  # export.dtype: every tensor cast
            layout = [TensorSpec(spec.name, dtype, spec.shape) for spec in layout]
        weights = ((name, tensor.to(dtype) if dtype is not None else tensor) for name, tensor in policy.export_weights())
        write_hf_weights(weights, layout, policy.hf_config, target, writer_rank=True)
        del policy
    finally:
        destroy_model_parallel()
    export_hf_metadata(source, target, dtype or stored)


def materialise_hf(source: Path, staging: Path) -> Path:
    """A Hugging Face folder for ``source``: itself, or (a megatron training checkpoint) its
    weights written into ``staging`` (created, for the caller to delete)."""
    from fastmath_nemo.policy.megatron.checkpointing import is_distributed_checkpoint

    if not is_distributed_checkpoint(source):
        return source
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    export_hf_from_distributed(source, staging)
    return staging
