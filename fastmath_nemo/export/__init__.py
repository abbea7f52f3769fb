"""Export a stage checkpoint (either backend) as a Hugging Face folder, a megatron-core
distributed checkpoint or a NeMo 2 checkpoint: ``python launch/run.py conf=export
export.checkpoint=... export.format=hf|megatron|nemo export.dir=...``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fastmath_nemo.checkpoint.atomic import atomic_directory, mark_complete
from fastmath_nemo.config.schema import ExportConfig
from fastmath_nemo.export.source import resolve_checkpoint

logger = logging.getLogger(__name__)


def export_checkpoint(cfg: ExportConfig) -> Path:
    """Write ``cfg.format`` of ``cfg.checkpoint`` into ``cfg.dir`` (built aside and renamed
    into place, ending with a ``COMPLETE`` marker); returns ``cfg.dir``."""
    assert cfg.checkpoint is not None and cfg.dir is not None  # config/validate.py
    source = resolve_checkpoint(cfg.checkpoint)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype is not None else None
    if cfg.format == "hf":
        from fastmath_nemo.export.hf import export_hf as write
    elif cfg.format == "megatron":
        from fastmath_nemo.export.megatron import export_megatron as write  # megatron-core
    else:
        from fastmath_nemo.export.nemo import export_nemo as write  # megatron-core and NeMo
    target = Path(cfg.dir).expanduser()
    with atomic_directory(target) as tmp:
        write(source, tmp, dtype)
        mark_complete(tmp)
    logger.info("exported %s as %s into %s", source, cfg.format, target)
    return target
