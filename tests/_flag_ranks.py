"""Test helper: the body of one gloo rank for tests/utils/test_distributed.py (spawned ranks
import it afresh, so it imports nothing heavy)."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from fastmath_nemo.utils.distributed import any_rank, every_rank


def world_flags(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Each rank asks about three flags: only rank 1's is set, every rank's is set, none is set."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seen = {
        "one": [any_rank(rank == 1), every_rank(rank == 1)],
        "all": [any_rank(True), every_rank(True)],
        "none": [any_rank(False), every_rank(False)],
    }
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
