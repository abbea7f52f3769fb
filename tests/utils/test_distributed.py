"""World-wide flags (``utils.distributed.any_rank`` / ``every_rank``): what one rank decides,
every rank learns through one collective (preemption requests, non-finite steps)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp
from _flag_ranks import world_flags

from fastmath_nemo.utils import distributed
from fastmath_nemo.utils.distributed import any_rank, every_rank


def test_without_a_process_group_a_flag_is_its_own_answer() -> None:
    assert any_rank(True) and not any_rank(False)
    assert every_rank(True) and not every_rank(False)


def test_three_ranks_agree_on_any_and_every(tmp_path: Path) -> None:
    mp.spawn(world_flags, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"one": [True, False], "all": [True, True], "none": [False, False]}, f"rank {rank}"


def test_releasing_device_memory_collects_cycles_and_empties_the_cuda_cache(monkeypatch) -> None:
    class Held:
        pass

    held = Held()
    held.me = held  # a reference cycle, as a DDP wrapper and its model can make
    ref = weakref.ref(held)
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    gc.disable()
    try:
        del held
        assert ref() is not None  # only a collection frees a cycle
        distributed.release_device_memory()
    finally:
        gc.enable()
    assert ref() is None and emptied == [True]
