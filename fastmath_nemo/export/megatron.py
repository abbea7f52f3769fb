"""``export.format=megatron``: a megatron-core distributed checkpoint of the model weights.

``<dir>`` is what ``dist_checkpointing.save(model.sharded_state_dict(), <dir>)`` writes for a
``GPTModel`` (``mcore_layout``: TP / PP independent, so it loads into any layout with
``dist_checkpointing.load(model.sharded_state_dict(), <dir>)``), with the Hugging Face
``config.json`` and tokenizer beside it to rebuild the model (``policy/megatron/config.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from transformers import AutoConfig

from fastmath_nemo.export.hf import export_hf_metadata
from fastmath_nemo.export.mcore_layout import sharded_weights
from fastmath_nemo.export.source import stored_dtype
from fastmath_nemo.policy.megatron.model import _SafetensorsDir
from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel, init_model_parallel

# How the checkpoint was sharded (megatron-core reads it back with load_content_metadata):
# the SwiGLU fc1 as two halves of one key, not the ``_w`` / ``_v`` keys of singleton shards.
CONTENT_METADATA = {"singleton_local_shards": False}


def save_weights(source: Path, target: Path, *, dtype: torch.dtype, prefix: str = "",
                 content_metadata: dict[str, Any] | None = None) -> None:
    """``source``'s HF weights as a distributed checkpoint in ``target`` (created).

    One process: a world of one is set up for the save (with ``cpu_compat``'s redirections of
    megatron's CUDA calls on a CPU machine) and torn down after, if this call made it.
    """
    hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    sharded = sharded_weights(_SafetensorsDir(source), hf_config, prefix=prefix, dtype=dtype)
    target.mkdir(parents=True, exist_ok=True)
    init_model_parallel(1, 1, seed=0)
    try:
        dist_checkpointing.save(sharded, str(target), content_metadata=content_metadata)
    finally:
        destroy_model_parallel()


def export_megatron(source: Path, target: Path, dtype: torch.dtype | None = None) -> None:
    dtype = dtype or stored_dtype(source)
    save_weights(source, target, dtype=dtype, content_metadata=dict(CONTENT_METADATA))
    export_hf_metadata(source, target, dtype)
