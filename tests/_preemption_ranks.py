"""Test helper: the body of one gloo rank for tests/checkpoint/test_preemption.py, in a module that
imports nothing heavy (spawned ranks import it afresh; the test module pulls in transformers)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch.distributed as dist

from fastmath_nemo.checkpoint.preemption import preemption_requested, preemption_signals


def two_ranks(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1 signals itself between two checks; each rank writes what the checks returned."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    seen = []
    with preemption_signals():
        seen.append(preemption_requested())
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        seen.append(preemption_requested())
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
