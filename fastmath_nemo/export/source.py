"""What an export reads: a stage checkpoint of either backend.

``<stage>/final`` and the GRPO stage's kept candidates are Hugging Face folders whichever
backend trained them, and so are the PyTorch backend's ``checkpoints/step_N``. The megatron
backend's ``checkpoints/step_N`` are distributed checkpoints (``megatron/``, every rank's shards
of the model and optimizer) beside ``config.json`` and the tokenizer: ``export/hf.py`` reads
their weights at TP=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastmath_nemo.checkpoint.atomic import is_complete, latest_checkpoint

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a model folder (``config.json`` + safetensors); for a stage directory
    (``runs/recipe/grpo``) its ``final/`` if complete, else its latest ``checkpoints/step_N``.
    FileNotFoundError (naming ``export.checkpoint``) otherwise."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")) and not (path / "megatron").is_dir():
            raise FileNotFoundError(f"export.checkpoint={path}: config.json but no *.safetensors weights and no "
                                    "megatron/ distributed checkpoint")
        return path
    if is_complete(path / "final"):
        return path / "final"
    latest = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if latest is not None:
        return latest
    raise FileNotFoundError(
        f"export.checkpoint={path}: not a model folder (no config.json) nor a stage directory with a complete "
        "final/ or checkpoints/step_N (e.g. runs/recipe/grpo/final)"
    )


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype of the first floating-point tensor in ``folder``'s safetensors (read from the
    header only). Stage checkpoints write their tensors as trained, whatever ``config.json``
    says, so a bit-exact export keeps this dtype rather than the config's."""
    first = sorted(folder.glob("*.safetensors"))[0]
    with first.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    for name, entry in header.items():
        if name != "__metadata__" and entry["dtype"] in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[entry["dtype"]]
    raise ValueError(f"{first}: no float32, bfloat16 or float16 tensor")
