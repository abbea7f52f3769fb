"""World-wide flags (``utils.distributed.any_rank`` / ``every_rank``): what one rank decides,
every rank learns through one collective (preemption requests, non-finite steps)."""

from __future__ import annotations

import json
from pathlib import Path

import torch.multiprocessing as mp
from _flag_ranks import world_flags

from fastmath_nemo.utils.distributed import any_rank, every_rank


def test_without_a_process_group_a_flag_is_its_own_answer() -> None:
    assert any_rank(True) and not any_rank(False)
    assert every_rank(True) and not every_rank(False)


def test_three_ranks_agree_on_any_and_every(tmp_path: Path) -> None:
    mp.spawn(world_flags, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"one": [True, False], "all": [True, True], "none": [False, False]}, f"rank {rank}"
