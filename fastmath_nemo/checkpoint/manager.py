"""Stage checkpoints: ``<stage_dir>/checkpoints/step_N`` written atomically, and
``<stage_dir>/final`` (a Hugging Face folder that the next stage or vLLM loads).

A checkpoint is built in a temporary sibling and renamed into place with a ``COMPLETE``
marker once every rank's part is on disk, so ``latest()`` never returns a half-written one.
With ``async_save`` a policy that can write in the background (the megatron backend) does,
and the loop goes on: :meth:`CheckpointManager.poll`, called once per step, completes the
checkpoint when its write has finished, and at most one write is in flight (a new save, the
final save and a preemption first :meth:`wait` for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from fastmath_nemo.checkpoint.atomic import (
    begin_directory,
    commit_directory,
    is_complete,
    latest_checkpoint,
    mark_complete,
    prune_checkpoints,
    remove_stale,
)
from fastmath_nemo.checkpoint.portable_folders import save_tokenizer
from fastmath_nemo.utils.distributed import barrier, broadcast_object, is_rank0

logger = logging.getLogger(__name__)


class PendingWrite(Protocol):
    """A checkpoint write going on in the background."""

    def finished(self, wait: bool) -> bool:
        """Whether every rank's part is on disk (``wait``: block until it is); a collective."""
        ...


class Checkpointable(Protocol):
    """What the manager needs of a policy (``policy.base.Policy`` has it): a save into a folder."""

    # True when every rank holds a shard of the weights and must take part in save() (megatron);
    # False when rank 0 holds all of them (the manager then saves on rank 0 alone).
    saves_collectively: bool

    def save(self, directory: Path, extra_state: dict[str, Any] | None = None, weights_only: bool = False,
             *, asynchronous: bool = False) -> PendingWrite | None:
        ...


@dataclass
class _InFlight:
    write: PendingWrite
    tmp: Path | None  # rank 0's temporary directory (None elsewhere)
    target: Path
    state: dict[str, Any]


class CheckpointManager:
    """``keep_last``: complete ``step_N`` checkpoints kept (older ones are deleted once a newer
    one is complete). ``async_save``: step checkpoints are written in the background where the
    policy can (``checkpoint.async_save``)."""

    def __init__(self, stage_dir: Path, tokenizer: PreTrainedTokenizerBase, keep_last: int = 2,
                 *, async_save: bool = False) -> None:
        self.stage_dir = Path(stage_dir)
        self.root = self.stage_dir / "checkpoints"
        self.final_dir = self.stage_dir / "final"
        self.tokenizer = tokenizer
        self.keep_last = keep_last
        self.async_save = async_save
        # The loop state of the newest complete step checkpoint this run wrote or resumed from:
        # what a resume would restore (the GRPO stage keeps the candidates it may still choose).
        self.committed_state: dict[str, Any] | None = None
        self._in_flight: _InFlight | None = None
        if is_rank0():
            for path in remove_stale(self.root) + remove_stale(self.stage_dir):
                logger.warning("removed %s, left by a killed run", path)

    # -- writing -------------------------------------------------------------------------------
    def _write(self, policy: Checkpointable, target: Path, state: dict[str, Any], *, weights_only: bool,
               asynchronous: bool = False) -> None:
        """Build ``target`` in rank 0's temporary directory: every rank saves into it when the
        policy's weights are sharded over ranks (``saves_collectively``), else rank 0 alone.
        Complete now, or once the policy's background write has finished."""
        self.wait()
        tmp = begin_directory(target) if is_rank0() else None
        pending = None
        if policy.saves_collectively:
            shared = Path(str(broadcast_object(str(tmp))))
            pending = policy.save(shared, extra_state=state, weights_only=weights_only, asynchronous=asynchronous)
        elif is_rank0():
            assert tmp is not None
            policy.save(tmp, extra_state=state, weights_only=weights_only)
        if pending is None:
            barrier()
            self._complete(tmp, target, state)
        else:
            self._in_flight = _InFlight(pending, tmp, target, state)

    def _complete(self, tmp: Path | None, target: Path, state: dict[str, Any]) -> None:
        """Rank 0 adds the tokenizer and the ``COMPLETE`` marker and renames ``tmp`` into place
        (then prunes old step checkpoints); every rank waits for it."""
        if is_rank0():
            assert tmp is not None
            save_tokenizer(self.tokenizer, tmp)
            mark_complete(tmp)
            commit_directory(tmp, target)
            if target.parent == self.root:
                prune_checkpoints(self.root, self.keep_last)
        if target.parent == self.root:
            self.committed_state = state
        barrier()
        logger.info("checkpoint saved: %s", target)

    def poll(self) -> None:
        """Complete the checkpoint in flight if its write has finished (a collective, cheap: call
        it once per step on every rank)."""
        if self._in_flight is not None and self._in_flight.write.finished(wait=False):
            self._finish_in_flight()

    def wait(self) -> None:
        """Block until the checkpoint in flight is complete (a collective)."""
        if self._in_flight is not None:
            self._in_flight.write.finished(wait=True)
            self._finish_in_flight()

    def _finish_in_flight(self) -> None:
        done, self._in_flight = self._in_flight, None
        assert done is not None
        self._complete(done.tmp, done.target, done.state)

    def save(self, policy: Checkpointable, step: int, state: dict[str, Any]) -> Path:
        """A resumable checkpoint ``step_N`` (in the background with ``async_save``); returns
        where it will be complete."""
        target = self.root / f"step_{step}"
        self._write(policy, target, {**state, "step": step}, weights_only=False, asynchronous=self.async_save)
        return target

    def save_as(self, policy: Checkpointable, target: Path, state: dict[str, Any]) -> Path:
        """A complete weights-only checkpoint at ``target`` (no optimizer state), outside the
        pruned ``step_N`` series (the GRPO stage's kept-checkpoint candidates,
        ``algorithms.checkpoint_choice``)."""
        self._write(policy, Path(target), state, weights_only=True)
        return Path(target)

    def save_final(self, policy: Checkpointable, state: dict[str, Any]) -> Path:
        """``final/``: the weights as a Hugging Face folder, no optimizer state."""
        self._write(policy, self.final_dir, state, weights_only=True)
        logger.info("final model saved: %s", self.final_dir)
        return self.final_dir

    # -- reading -------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        return latest_checkpoint(self.root) if self.root.exists() else None

    def is_finished(self) -> bool:
        return is_complete(self.final_dir)
