"""Stage checkpoints: ``<stage_dir>/checkpoints/step_N`` written atomically, and
``<stage_dir>/final`` (a Hugging Face folder that the next stage or vLLM loads)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from fastmath_nemo.checkpoint.atomic import (
    atomic_directory,
    is_complete,
    latest_checkpoint,
    mark_complete,
    prune_checkpoints,
    remove_stale,
)
from fastmath_nemo.utils.distributed import barrier, broadcast_object, is_rank0

logger = logging.getLogger(__name__)


class Checkpointable(Protocol):
    """What the manager needs of a policy (``policy.base.Policy`` has it): a save into a folder."""

    # True when every rank holds a shard of the weights and must take part in save() (megatron);
    # False when rank 0 holds all of them (the manager then saves on rank 0 alone).
    saves_collectively: bool

    def save(self, directory: Path, extra_state: dict[str, Any] | None = None, weights_only: bool = False) -> None:
        ...


class CheckpointManager:
    def __init__(self, stage_dir: Path, tokenizer: PreTrainedTokenizerBase, keep_last: int = 2) -> None:
        self.stage_dir = Path(stage_dir)
        self.root = self.stage_dir / "checkpoints"
        self.final_dir = self.stage_dir / "final"
        self.tokenizer = tokenizer
        self.keep_last = keep_last
        if is_rank0():
            for path in remove_stale(self.root) + remove_stale(self.stage_dir):
                logger.warning("removed %s, left by a killed run", path)

    def _write(self, policy: Checkpointable, target: Path, state: dict[str, Any], weights_only: bool = False) -> None:
        """Rank 0 writes; every rank waits until the directory is complete. A policy whose
        weights are sharded over ranks (``saves_collectively``) is saved by every rank into
        rank 0's temporary directory, which is then completed and renamed as usual."""
        collective = policy.saves_collectively
        with atomic_directory(target) if is_rank0() else contextlib.nullcontext() as tmp:
            if collective:
                policy.save(Path(str(broadcast_object(str(tmp)))), extra_state=state, weights_only=weights_only)
                barrier()
            if is_rank0():
                assert tmp is not None  # rank 0 holds the atomic directory
                if not collective:
                    policy.save(tmp, extra_state=state, weights_only=weights_only)
                self.tokenizer.save_pretrained(str(tmp))
                mark_complete(tmp)
        barrier()

    def save(self, policy: Checkpointable, step: int, state: dict[str, Any]) -> Path:
        target = self.root / f"step_{step}"
        self._write(policy, target, {**state, "step": step})
        if is_rank0():
            prune_checkpoints(self.root, self.keep_last)
        logger.info("checkpoint saved: %s", target)
        return target

    def save_as(self, policy: Checkpointable, target: Path, state: dict[str, Any]) -> Path:
        """A complete weights-only checkpoint at ``target`` (no optimizer state), outside the
        pruned ``step_N`` series (the GRPO stage's kept-checkpoint candidates,
        ``algorithms.checkpoint_choice``)."""
        self._write(policy, Path(target), state, weights_only=True)
        logger.info("checkpoint saved: %s", target)
        return Path(target)

    def save_final(self, policy: Checkpointable, state: dict[str, Any]) -> Path:
        self._write(policy, self.final_dir, state)
        logger.info("final model saved: %s", self.final_dir)
        return self.final_dir

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root) if self.root.exists() else None

    def is_finished(self) -> bool:
        return is_complete(self.final_dir)
