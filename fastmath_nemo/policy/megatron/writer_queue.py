"""megatron-core's checkpoint writer, with nothing left behind when a trainer dies.

``FileSystemWriterAsync`` (which writes every distributed checkpoint, synchronous ones too)
collects its writers' results in a queue served by a multiprocessing
``Manager``: a spawned interpreter (``filesystem_async._get_write_results_queue``; it re-imports
the trainer's main module, about 430 MB) that nothing stops when its trainer is SIGKILLed (the
OOM killer, a failed rank's peers torn down by Slurm): it stayed on the machine, orphaned, after
every killed run. The same queue here is served by a Manager that Linux kills with its parent
(``PR_SET_PDEATHSIG``). megatron-core has no setting for it, so its module-level queue is
filled before its first save asks for one.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_manager: SyncManager | None = None


def _die_with_parent(parent: int) -> None:
    """Initializer of the Manager's process: be SIGKILLed when the trainer exits (Linux only;
    elsewhere the process is left as megatron-core leaves it)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the trainer died before prctl took effect
        os._exit(0)


def tie_results_queue_to_trainer() -> None:
    """Serve megatron-core's writer results queue from a Manager that dies with this process
    (once per process, before its first distributed save; later calls do nothing). Call it from
    the thread that lives as long as the trainer (the loop's): Linux delivers the death signal
    when the thread that started the Manager exits."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # spawn, as megatron-core: CUDA forbids fork
        _manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = _manager.Queue()
