"""World-wide flags (``utils.distributed.any_rank`` / ``every_rank``): what one rank decides,
every rank learns through one collective (preemption requests, non-finite steps)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp
from _distributed_ranks import world_flags

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


def test_a_replica_splits_its_rows_over_its_ranks_and_shares_the_results(tmp_path: Path) -> None:
    from _distributed_ranks import replica_work

    mp.spawn(replica_work, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=4, join=True)
    out = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)}
    for rank, got in out.items():
        replica = rank // 2
        rows = [f"replica{replica}-row{i}" for i in range(5)]
        assert got["mapped"] == [row.upper() for row in rows]  # every rank has every row's result
        assert got["seen"] == rows[rank % 2 :: 2]  # but computed only its share
        assert got["once"] == f"computed on {2 * replica}"  # the replica's first rank computes once
        assert got["calls"] == ([rank] if rank % 2 == 0 else [])


def test_a_collective_left_waiting_raises_within_the_timeout(tmp_path: Path) -> None:
    from _cli import free_port
    from _distributed_ranks import stuck_peer

    (tmp_path / "port").write_text(str(free_port()))
    mp.spawn(stuck_peer, args=(str(tmp_path / "port"), str(tmp_path)), nprocs=2, join=True)
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert "Timed out" in got["outcome"] and got["waited_s"] < 8, got  # 2 s, not torch's 30 minutes
    assert got["recognised"]  # launch/run.py words it as a lost rank, exit code 1
