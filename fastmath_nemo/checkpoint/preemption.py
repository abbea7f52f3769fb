"""Preemption: a signal or a stop file asks the run to save a checkpoint and exit for a requeue.

Who asks:

- ``SIGUSR1`` / ``SIGTERM`` to a trainer process (Slurm's ``--signal=USR1@N`` on the steps,
  ``scancel --signal=USR1``, a preemption's or time limit's ``SIGTERM``): the handler from
  :func:`preemption_signals` only sets a flag, so no step is cut in half.
- The file named by ``$FASTMATH_STOP_FILE`` existing: ``launch/slurm/fastmath.sbatch`` touches
  it when its batch shell gets ``--signal=B:USR1@N``, so no process of the step (torchrun, the
  verifier's workers, ...) is signalled at all.

Where it is acted on: the SFT and GRPO loops call the collective :func:`preemption_requested`
once per step, after the step is complete, and right after each rollout. Any rank's request
reaches every rank through one all-reduce (MAX over the whole world, model-parallel peers
included), so all ranks save the same step's checkpoint together and
:func:`stop_for_preemption` raises :class:`Preempted`; ``launch/run.py`` turns that into exit
code :data:`PREEMPTED_EXIT_CODE`. Rank 0 also writes ``$FASTMATH_PREEMPTED_FILE`` (stage,
step, checkpoint): torchrun reports any worker's non-zero exit as 1, so the batch script
learns from this file, not the exit code, that the run stopped for a requeue rather than
failed. ``resume=true`` then continues from that checkpoint.

Work that can take far longer than the warning is abandoned instead of finished: the
generators look at :func:`stop_requested_here` every few decoding steps and return what they
have, marked abandoned; an abandoned rollout is dropped and an abandoned evaluation raises
``RolloutsAbandoned``. The state after the last complete step is saved either way, so the
time from a request to the exit is bounded by one training step (which is not cut), a few
decoding steps and the save (``run.plan`` prints the lead time that needs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fastmath_nemo.checkpoint.atomic import atomic_write_json
from fastmath_nemo.utils.distributed import any_rank, is_rank0

if TYPE_CHECKING:  # the manager pulls in transformers; launchers import this module's names
    from fastmath_nemo.checkpoint.manager import CheckpointManager, Checkpointable

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
STOP_FILE_ENV = "FASTMATH_STOP_FILE"
PREEMPTED_FILE_ENV = "FASTMATH_PREEMPTED_FILE"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []  # signal numbers seen by this process, in order


class Preempted(Exception):
    """The run saved ``checkpoint`` (step ``step`` of ``stage``; None: stopped before its first
    step, with nothing to save) and stops so that it can be requeued."""

    def __init__(self, stage: str, step: int, checkpoint: Path | None) -> None:
        saved = f"saved step {step} to {checkpoint}" if checkpoint is not None else "stopped before its first step"
        super().__init__(f"preempted: {stage} {saved}; rerun with resume=true")
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


def _on_signal(signum: int, _frame: object) -> None:
    # Only record it: a Python handler runs between bytecodes of the main thread, possibly in
    # the middle of a step; the loops act on it once the step is complete.
    _received.append(signum)


@contextlib.contextmanager
def preemption_signals(signals: tuple[signal.Signals, ...] = SIGNALS) -> Iterator[None]:
    """Within the block, ``signals`` set the preemption flag instead of killing the process;
    afterwards the previous handlers are back and the flag is cleared (a caller that runs
    ``launch/run.py``'s ``main`` in-process keeps its own SIGTERM). Outside the main thread,
    where Python cannot install handlers, only the stop file can ask for a stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()


def _local_request() -> str | None:
    """Why this rank wants to stop: a signal's name, the stop file's path, or None."""
    if _received:
        return signal.Signals(_received[0]).name
    stop_file = os.environ.get(STOP_FILE_ENV)
    if stop_file and os.path.exists(stop_file):
        return stop_file
    return None


def stop_requested_here() -> bool:
    """Whether this process got a stop signal or sees the stop file (no communication: for
    work that checks often, such as a generator between decoding steps)."""
    return _local_request() is not None


def preemption_requested() -> bool:
    """True on every rank when any rank got a signal or sees the stop file. Collective: all
    ranks must call it at the same point (the loops do, once per step); no communication
    without a multi-rank process group."""
    reason = _local_request()
    requested = any_rank(reason is not None)
    if requested:
        logger.warning("preemption requested (%s): saving a checkpoint and stopping",
                       reason or "by another rank")
    return requested


def stop_for_preemption(checkpoints: CheckpointManager, policy: Checkpointable, stage: str, step: int,
                        state: dict[str, Any], *, saved: bool = False) -> NoReturn:
    """Save step ``step`` with loop ``state`` (unless the loop just ``saved`` it), wait until
    it is complete on disk, record the stop in ``$FASTMATH_PREEMPTED_FILE`` (rank 0) and raise
    :class:`Preempted` on every rank."""
    path = checkpoints.root / f"step_{step}" if saved else checkpoints.save(policy, step, state)
    checkpoints.wait()  # an asynchronous write must be on disk before the process exits
    raise_preempted(stage, step, path)


def raise_preempted(stage: str, step: int, saved: Path | None) -> NoReturn:
    """Record in ``$FASTMATH_PREEMPTED_FILE`` (rank 0) that ``stage`` stopped with its work up to
    ``step`` kept in ``saved`` (None: nothing to keep), and raise :class:`Preempted`."""
    record = os.environ.get(PREEMPTED_FILE_ENV)
    if record and is_rank0():
        atomic_write_json(Path(record), {"stage": stage, "step": step,
                                         "checkpoint": str(saved) if saved is not None else None})
    raise Preempted(stage, step, saved)
