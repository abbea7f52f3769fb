"""CheckpointManager: resumable step checkpoints carry the optimizer state; the GRPO stage's
kept-checkpoint candidates (``save_as``) are weights only."""

from __future__ import annotations

import copy

import torch

from fastmath_nemo.checkpoint.atomic import is_complete
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.checkpoint.trainer_state import TRAINER_STATE, load_trainer_state
from fastmath_nemo.config.schema import OptimizerConfig
from fastmath_nemo.policy.torch_policy import TorchPolicy


def test_step_checkpoints_hold_the_optimizer_and_candidates_only_the_weights(tiny_task, tmp_path):
    policy = TorchPolicy(copy.deepcopy(tiny_task.model), torch.device("cpu"))
    policy.setup_optimizer(OptimizerConfig(lr=1e-3), total_steps=4)
    checkpoints = CheckpointManager(tmp_path / "grpo", tiny_task.tokenizer)

    step = checkpoints.save(policy, 3, {"rng": 1})
    candidate = checkpoints.save_as(policy, tmp_path / "grpo" / "candidates" / "step_3", {"step": 3})

    assert is_complete(step) and is_complete(candidate)
    assert "optimizer" in load_trainer_state(step / TRAINER_STATE)
    state = load_trainer_state(candidate / TRAINER_STATE)
    assert "optimizer" not in state and state["extra"] == {"step": 3}
    loaded = TorchPolicy(copy.deepcopy(tiny_task.model), torch.device("cpu"))
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(1.0)
    loaded.load(candidate)
    for (name, a), b in zip(policy.model.named_parameters(), loaded.model.parameters()):
        assert torch.equal(a, b), name
