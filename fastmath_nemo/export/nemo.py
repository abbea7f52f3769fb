"""``export.format=nemo``: a NeMo 2 checkpoint (``nemo_toolkit`` 2.7, ``nemo.collections.llm``)::

    <dir>/context/   io.json, model.yaml, nemo_tokenizer/, artifacts/generation_config.json:
                     NeMo's own serialisation of a ``TrainerContext`` (``nemo_context.py``)
    <dir>/weights/   a megatron-core distributed checkpoint: ``metadata.json``, ``.metadata``,
                     ``*.distcp``, ``common.pt`` (holding ``content_metadata``)

The weights are ``mcore_layout``'s keys behind NeMo's ``module.`` prefix (NeMo wraps the
``GPTModel`` as ``module``; without the prefix NeMo's loader fails with a KeyError).

Why ``context/`` needs NeMo installed, instead of being written by hand: ``io.json`` is
fiddle's serialisation of NeMo's own classes (``Qwen2Config``, its ``AutoTokenizer``, the
``Trainer`` and ``MegatronStrategy`` with every argument), whose form changes between NeMo
releases; a copy written here would drift from the NeMo a user runs and could load as a
silently different model. Whoever hands a model on as a NeMo checkpoint has NeMo, so the
export uses it (``fastmath_nemo.preflight`` refuses ``export.format=nemo`` at start-up without it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastmath_nemo.export.megatron import save_weights
from fastmath_nemo.export.source import stored_dtype

PREFIX = "module."
# What llm.import_ckpt writes (MegatronStrategy.sharded_state_dict_metadata, NeMo 2.7.3): how
# a resumed NeMo run shards the (here absent) optimizer state.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                    "distrib_optim_sharding_type": "dp_reshardable"}


def export_nemo(source: Path, target: Path, dtype: torch.dtype | None = None) -> None:
    from fastmath_nemo.export.nemo_context import write_context  # imports NeMo

    dtype = dtype or stored_dtype(source)
    write_context(source, target / "context", dtype)
    save_weights(source, target / "weights", dtype=dtype, prefix=PREFIX, content_metadata=dict(CONTENT_METADATA))
