"""``trainer_state.pt``: the loop state beside a checkpoint's weights, read without unpickling code.

Both policies save plain data there: the loop's dict (step, epoch), and the PyTorch backend's
optimizer and LR-scheduler ``state_dict()`` (tensors, numbers, tuples, ``None``). All of it
loads under ``torch.load(weights_only=True)``, which refuses pickled objects whose loading
would run code, so a checkpoint copied from elsewhere cannot execute anything when resumed.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

TRAINER_STATE = "trainer_state.pt"


class TrainerStateError(RuntimeError):
    """A state file that is not a plain dict of tensors, numbers and containers."""


def load_trainer_state(path: Path, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """The dict saved at ``path`` (tensors moved to ``map_location``), loaded with
    ``weights_only=True``; :class:`TrainerStateError` naming the file when it holds anything else."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise TrainerStateError(
            f"{path}: refused to load: it holds pickled objects that could run code, not only tensors "
            f"and plain containers ({str(e).splitlines()[0]}). This project never writes such a file; "
            "if you trust it, convert it to plain tensors / dicts first"
        ) from None
    if not isinstance(state, dict):
        raise TrainerStateError(f"{path}: expected a dict of trainer state, got {type(state).__name__}")
    return state
