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


class _BackgroundWrites:
    """A collective policy whose saves finish when the test says so (as megatron's async ones)."""

    saves_collectively = True

    def __init__(self) -> None:
        self.writes: list[dict] = []

    def save(self, directory, extra_state=None, weights_only=False, *, asynchronous=False):
        (directory / "weights.bin").write_bytes(b"\0" * 8)
        write = {"done": not asynchronous, "weights_only": weights_only, "step": (extra_state or {}).get("step")}
        self.writes.append(write)
        if not asynchronous:
            return None

        class Pending:
            def finished(self, wait: bool) -> bool:
                if wait:
                    write["done"] = True
                return write["done"]

        return Pending()


def test_an_asynchronous_checkpoint_counts_once_complete_and_one_is_in_flight(tiny_task, tmp_path):
    policy = _BackgroundWrites()
    checkpoints = CheckpointManager(tmp_path / "sft", tiny_task.tokenizer, keep_last=1, async_save=True)
    first = checkpoints.save(policy, 5, {"epoch": 0})
    assert checkpoints.latest() is None and not first.exists()  # written in the background
    checkpoints.poll()  # not finished: nothing changes
    assert checkpoints.latest() is None and checkpoints.committed_state is None
    policy.writes[0]["done"] = True
    checkpoints.poll()  # finished: completed, marked and renamed into place
    assert checkpoints.latest() == first and is_complete(first) and (first / "tokenizer.json").is_file()
    assert checkpoints.committed_state == {"epoch": 0, "step": 5}

    second = checkpoints.save(policy, 10, {"epoch": 1})
    third = checkpoints.save(policy, 15, {"epoch": 2})  # waits for the second first: one in flight
    assert policy.writes[1]["done"] and is_complete(second) and not third.exists()
    assert not first.exists()  # keep_last=1: pruned once a newer checkpoint was complete
    final = checkpoints.save_final(policy, {"step": 20})  # the final save completes the third first
    assert is_complete(third) and not second.exists() and is_complete(final)
    assert [w["weights_only"] for w in policy.writes] == [False, False, False, True]
