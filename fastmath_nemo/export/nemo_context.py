"""``context/`` of a NeMo 2 checkpoint, written by NeMo itself (needs ``nemo_toolkit`` 2.7).

The model config comes from NeMo's own Hugging Face importer (``HFQwen2Importer.config`` and
its siblings: what ``llm.import_ckpt`` would build from the same folder) and is serialised with
``TrainerContext(...).io_dump(path, yaml_attrs=["model"])`` beside the trainer that
``import_ckpt`` uses, so ``nemo.lightning.io.load_context(<dir>, subpath="model")`` rebuilds it.
Three settings differ from the importer where it would build another model than the one
exported: tied embeddings follow the HF config (NeMo's Qwen2 importer always unties them), the
head width follows ``head_dim`` (NeMo's Qwen3 importer fixes 128) and the dtype follows
``export.dtype``.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig

from fastmath_nemo.export.hf import export_hf_metadata
from fastmath_nemo.policy.megatron.config import head_dim


def _model_and_importer(model_type: str) -> tuple[Any, Any]:
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter
    from nemo.collections.llm.gpt.model.qwen2 import HFQwen2Importer
    from nemo.collections.llm.gpt.model.qwen3 import HFQwen3Importer

    table = {"qwen2": (llm.Qwen2Model, HFQwen2Importer), "qwen3": (llm.Qwen3Model, HFQwen3Importer),
             "llama": (llm.LlamaModel, HFLlamaImporter)}
    if model_type not in table:
        raise ValueError(f"export.format=nemo: model_type {model_type!r} is not one of {', '.join(table)}")
    return table[model_type]


@contextlib.contextmanager
def config_builds_without_te() -> Iterator[None]:
    """CPU shim, confined to building the config object: megatron-core refuses a
    ``TransformerConfig`` whose ``apply_rope_fusion`` (NeMo's default, True) has no Transformer
    Engine kernel to call. Nothing is computed here, and the context records only the
    arguments NeMo's importer passed, so a GPU machine that loads it gets NeMo's defaults; the
    check sees a placeholder kernel for as long as the config is built, and raises if called."""
    from megatron.core.models.common.embeddings import rope_utils

    def placeholder(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("placeholder for Transformer Engine's fused RoPE (export only)")

    saved = rope_utils.fused_apply_rotary_pos_emb
    if saved is None and not torch.cuda.is_available():
        rope_utils.fused_apply_rotary_pos_emb = placeholder
    try:
        yield
    finally:
        rope_utils.fused_apply_rotary_pos_emb = saved


def _override(model: Any, **values: Any) -> None:
    """Set fields of a NeMo model's config and of ``model.__io__.config``, the fiddle record of
    the config's constructor arguments that ``io_dump`` serialises (a plain setattr would not
    reach it; the config is recorded when the model is built around it)."""
    for key, value in values.items():
        setattr(model.config, key, value)
        setattr(model.__io__.config, key, value)


def write_context(source: Path, target: Path, dtype: torch.dtype) -> None:
    """NeMo's ``context/`` for the model in HF folder ``source`` with weights of ``dtype``."""
    from nemo import lightning as nl
    from nemo.lightning.io.pl import TrainerContext

    hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    model_cls, importer_cls = _model_and_importer(hf_config.model_type)
    with tempfile.TemporaryDirectory() as staging:
        # What the importer reads: config.json (with the exported dtype), the tokenizer and a
        # generation_config.json (a megatron-backend checkpoint has none; transformers derives it).
        export_hf_metadata(source, Path(staging), dtype)
        if (source / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(str(source)).save_pretrained(staging)
        else:
            GenerationConfig.from_model_config(hf_config).save_pretrained(staging)
        importer = importer_cls(staging)
        importer.trust_remote_code = False  # set by importer.apply(), which is not called here; a local folder
        with config_builds_without_te():
            model = model_cls(importer.config, tokenizer=importer.tokenizer)
            _override(model, share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings))
            if model.config.kv_channels != head_dim(hf_config):  # NeMo's Qwen3 importer fixes 128
                _override(model, kv_channels=head_dim(hf_config))
            # The trainer llm.import_ckpt saves with (ModelConnector.nemo_setup).
            trainer = nl.Trainer(devices=1, accelerator="cpu",
                                 strategy=nl.MegatronStrategy(ckpt_save_optimizer=False, always_save_context=True))
            TrainerContext(model=model, trainer=trainer, extra={}).io_dump(target, yaml_attrs=["model"])
