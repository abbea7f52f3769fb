"""Test helpers: the bodies of gloo ranks for tests/utils/test_distributed.py (spawned ranks
import this module afresh, so it imports nothing heavy at the top)."""

from __future__ import annotations

import json
import os
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


def replica_work(rank: int, init_file: str, out_dir: str) -> None:
    """Four ranks as two model replicas of two (TP peers {0, 1} and {2, 3}; data-parallel groups
    {0, 2} and {1, 3}): each replica maps a function over its rows and runs one once."""
    from fastmath_nemo.utils.distributed import (
        map_over_replica,
        once_per_replica,
        register_model_replicas,
        set_data_parallel_group,
    )

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank makes every group
    set_data_parallel_group(dp_groups[rank % 2])
    register_model_replicas()
    replica = rank // 2
    rows = [f"replica{replica}-row{i}" for i in range(5)]
    seen: list[str] = []

    def upper(items: list[str]) -> list[str]:
        seen.extend(items)
        return [item.upper() for item in items]

    calls: list[int] = []
    result = {"mapped": map_over_replica(upper, rows), "seen": seen,
              "once": once_per_replica(lambda: calls.append(rank) or f"computed on {rank}"), "calls": calls}
    set_data_parallel_group(None)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def stuck_peer(rank: int, init_file: str, out_dir: str) -> None:
    """Two ranks with a 2-second timeout: rank 1 never joins the all-reduce rank 0 waits in."""
    import time

    import torch

    from fastmath_nemo.utils.distributed import init_distributed_if_needed, is_collective_failure, set_distributed_timeout

    set_distributed_timeout(2.0)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=Path(init_file).read_text())
    init_distributed_if_needed("cpu")
    if rank == 1:
        time.sleep(10)
        os._exit(0)
    start = time.monotonic()
    outcome, recognised = "returned", False
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as err:
        outcome, recognised = str(err).splitlines()[0], is_collective_failure(err)
    Path(out_dir, "rank0.json").write_text(json.dumps({"outcome": outcome, "recognised": recognised,
                                                       "waited_s": time.monotonic() - start}))
    os._exit(0)


def dynamic_sampling_step(rank: int, init_file: str, out_dir: str, tokenizer) -> None:
    """Two data-parallel ranks collect one dynamic-sampling step of scripted rollouts
    (tests/algorithms/test_rollout_rounds.py's problems): each writes the groups it trains and
    its metrics."""
    from fastmath_nemo.algorithms.rollout_rounds import StepPrompts, collect_step
    from fastmath_nemo.generation.base import SamplingParams
    from fastmath_nemo.utils.distributed import shard
    from tests.algorithms._scripted import SYSTEM_PROMPT, ScriptedGenerator, grpo_config, scripted_completions
    from tests.algorithms.test_rollout_rounds import RECORDS

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = grpo_config(prompts_per_step=4, dynamic_sampling=True, dynamic_sampling_max_rounds=6)
    prompts = StepPrompts(RECORDS, tokenizer, SYSTEM_PROMPT, cfg, seed=5)
    rows, generated, metrics = collect_step(ScriptedGenerator(scripted_completions(tokenizer)), prompts,
                                            shard([0, 1, 3, 9]), SamplingParams(n=2, seed=11), cfg, step=0, seed=5)
    dist.destroy_process_group()
    groups = [tokenizer.decode(p) for p in rows.prompts]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "groups": groups, "correct": rows.correct, "rewards": rows.rewards.tolist(), "generated": len(generated),
        "metrics": {k: v for k, v in metrics.items() if not k.startswith("timing/")}}))
