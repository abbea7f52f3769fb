"""trainer_state.pt is read with torch.load(weights_only=True): real states load, code does not run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fastmath_nemo.algorithms.losses import sft_loss
from fastmath_nemo.batching.batch import batch_from_sequences
from fastmath_nemo.checkpoint.trainer_state import TRAINER_STATE, TrainerStateError, load_trainer_state
from fastmath_nemo.config.schema import OptimizerConfig
from fastmath_nemo.policy.torch_policy import TorchPolicy


class _Payload:
    """Unpickling this runs ``os.system`` (what a tampered checkpoint could carry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _tampered(directory: Path) -> Path:
    marker = directory / "pwned"
    torch.save({"extra": {"step": 1}, "payload": _Payload(marker)}, directory / TRAINER_STATE)
    return marker


def test_state_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = _tampered(tmp_path)
    with pytest.raises(TrainerStateError, match=rf"{TRAINER_STATE}: refused to load"):
        load_trainer_state(tmp_path / TRAINER_STATE)
    assert not marker.exists()


def test_torch_policy_state_loads_weights_only_and_refuses_code(tiny_task, tmp_path: Path) -> None:
    """What TorchPolicy saves (AdamW + LambdaLR state dicts, the loop dict) loads under
    weights_only=True; a tampered file fails the policy's load without running its code."""
    policy = TorchPolicy(tiny_task.fresh_model(), torch.device("cpu"))
    policy.setup_optimizer(OptimizerConfig(lr=1e-3, warmup_ratio=0.2, betas=[0.9, 0.95]), total_steps=5)
    ids, mask = tiny_task.sft_examples(1)[0]
    policy.train_step([batch_from_sequences([ids], [mask], tiny_task.pad_id)], sft_loss)
    policy.save(tmp_path / "ckpt", extra_state={"step": 1, "epoch": 0})

    state = torch.load(tmp_path / "ckpt" / TRAINER_STATE, weights_only=True)
    assert state["extra"] == {"step": 1, "epoch": 0}
    assert state["scheduler"]["last_epoch"] == 1 and state["optimizer"]["state"]

    marker = _tampered(tmp_path / "ckpt")
    with pytest.raises(TrainerStateError, match="refused to load"):
        policy.load(tmp_path / "ckpt")
    assert not marker.exists()
