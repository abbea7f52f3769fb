"""The one place that touches devices and torch.distributed.

Everything works without an initialised process group (single process, world size 1);
under ``torchrun`` the usual env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) drive :func:`init_distributed_if_needed`.
"""

from __future__ import annotations

import gc
import logging
import os
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from fastmath_nemo.config.schema import Device

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")
R = TypeVar("R")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def rank() -> int:
    """Global rank: from the process group when initialised, else env RANK (default 0)."""
    return dist.get_rank() if _initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """World size: from the process group when initialised, else env WORLD_SIZE (default 1)."""
    return dist.get_world_size() if _initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """Rank within the node (env LOCAL_RANK, default 0); picks the CUDA device."""
    return _env_int("LOCAL_RANK", 0)


def is_rank0() -> bool:
    return rank() == 0


# -- timeouts ---------------------------------------------------------------------------------
_timeout: timedelta | None = None  # run.distributed_timeout_s; None: torch's defaults


def set_distributed_timeout(seconds: float) -> None:
    """How long any collective may wait for a rank (``run.distributed_timeout_s``), for every
    process group made from now on in this process: the trainer's (:func:`init_distributed_if_needed`),
    megatron's (``policy/megatron/parallel.py`` passes it on) and those libraries make without a
    ``timeout`` argument, such as vLLM's engine groups, which take torch's module defaults: those
    are set here too (NCCL's is 10 minutes, shorter than a rank's wait while another finishes a
    32k-token rollout). A collective left waiting longer by a dead or stuck rank raises."""
    global _timeout
    _timeout = timedelta(seconds=seconds)
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = _timeout
    c10d.default_pg_nccl_timeout = _timeout


def distributed_timeout() -> timedelta | None:
    """The timeout set by :func:`set_distributed_timeout`, or None (torch's defaults)."""
    return _timeout


# How gloo words a peer that never came (its timeout) or went away (a killed rank).
_LOST_PEER = ("Timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that waited past the timeout or lost a rank (NCCL raises
    ``DistBackendError``; gloo a RuntimeError saying so)."""
    distributed_error = getattr(dist, "DistBackendError", ())
    return (isinstance(distributed_error, type) and isinstance(err, distributed_error)) or (
        isinstance(err, RuntimeError) and any(words in str(err) for words in _LOST_PEER))


# Model-parallel backends (megatron) set the data-parallel group: tensor- and pipeline-parallel
# peers must see the same rows, so data is split over data-parallel ranks only.
_data_parallel_group: dist.ProcessGroup | None = None
# The ranks that hold one model replica (TP x PP x CP peers: the same data-parallel rank) and so
# the same rows; None: every rank is a replica of its own.
_replica_group: dist.ProcessGroup | None = None


def set_data_parallel_group(group: dist.ProcessGroup | None) -> None:
    """Register the backend's data-parallel group (None: the whole world); the model-replica
    group is dropped with it (:func:`register_model_replicas` builds it again)."""
    global _data_parallel_group, _replica_group
    _data_parallel_group = group
    _replica_group = None


def _dp_group() -> dist.ProcessGroup | None:
    """The data-parallel group while its process group lives (else None: the whole world)."""
    return _data_parallel_group if _data_parallel_group is not None and _initialized() else None


def data_parallel_rank() -> int:
    group = _dp_group()
    return dist.get_rank(group) if group is not None else rank()


def data_parallel_size() -> int:
    group = _dp_group()
    return dist.get_world_size(group) if group is not None else world_size()


def register_model_replicas() -> None:
    """Group the ranks that share a data-parallel rank (one model replica's TP, PP and CP peers,
    which hold the same rows), for :func:`map_over_replica` and :func:`once_per_replica`. A
    collective over the world; call after :func:`set_data_parallel_group`."""
    global _replica_group
    if not _initialized() or dist.get_world_size() == 1:
        return
    dp_ranks: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(dp_ranks, data_parallel_rank())
    members = [[r for r, d in enumerate(dp_ranks) if d == dp] for dp in sorted(set(dp_ranks))]
    _replica_group, _ = dist.new_subgroups_by_enumeration(members, timeout=_timeout)


def _replica() -> dist.ProcessGroup | None:
    group = _replica_group if _replica_group is not None and _initialized() else None
    return group if group is not None and dist.get_world_size(group) > 1 else None


def map_over_replica(fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R]:
    """``fn(items)`` computed once per model replica: the replica's ranks (which hold the same
    ``items``) each take every n-th item and share their results, so work such as answer
    verification is split over a replica's TP ranks, not repeated on each. ``fn`` maps a list
    to a list of the same length. A collective over the replica; ``fn(items)`` without one."""
    group = _replica()
    if group is None:
        return fn(items)
    size, index = dist.get_world_size(group), dist.get_rank(group)
    mine = fn(items[index::size])
    parts: list[list[R] | None] = [None] * size
    dist.all_gather_object(parts, mine, group=group)
    out: list[Any] = [None] * len(items)
    for k, part in enumerate(parts):
        assert part is not None
        out[k::size] = part
    return out


def once_per_replica(fn: Callable[[], R]) -> R:
    """``fn()`` on the first rank of this model replica, its result on every rank of the replica
    (a collective over the replica; ``fn()`` without one)."""
    group = _replica()
    if group is None:
        return fn()
    first = dist.get_process_group_ranks(group)[0]
    return broadcast_object(fn() if dist.get_rank() == first else None, src=first, group=group)  # type: ignore[return-value]


def broadcast_object(value: object, src: int = 0, group: dist.ProcessGroup | None = None) -> object:
    """``value`` as (global) rank ``src`` has it, on every rank of ``group`` (default: all);
    the value itself for a group of one."""
    if not _initialized() or dist.get_world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def resolve_device(name: Device | str) -> torch.device:
    """``cpu`` -> cpu; ``cuda`` -> ``cuda:<LOCAL_RANK>`` (error if CUDA is unavailable);
    ``auto`` -> cuda when available, else cpu."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return resolve_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device='cuda' was requested but CUDA is not available "
                "(torch.cuda.is_available() is False); use device='cpu' or device='auto'"
            )
        index = local_rank()
        count = torch.cuda.device_count()
        if index >= count:
            raise RuntimeError(f"LOCAL_RANK={index} but only {count} CUDA device(s) are visible")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {name!r}; expected 'cpu', 'cuda' or 'auto'")


def init_distributed_if_needed(device: Device | str | torch.device) -> bool:
    """Initialise torch.distributed from torchrun env vars when WORLD_SIZE > 1.

    Backend: nccl for CUDA, gloo for CPU. Returns True when a process group is active
    afterwards, False for single-process runs (nothing is initialised then).
    """
    if _initialized():
        return True
    if _env_int("WORLD_SIZE", 1) <= 1:
        return False
    missing = [v for v in _TORCHRUN_VARS if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE > 1 but {missing} unset; launch with torchrun")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build lacks torch.distributed")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda":
        # Bind the device before NCCL init so collectives and barriers use the right GPU.
        torch.cuda.set_device(dev.index if dev.index is not None else local_rank())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=_timeout)
    return True


def destroy_distributed() -> None:
    """Tear down the process group if one is active (call at exit)."""
    if _initialized():
        # Free unreachable DDP wrappers first, while the group is still registered: a Reducer
        # freed after it holds the group's last reference and destroys it with the GIL held,
        # which deadlocks when gloo's worker thread needs the GIL to free a finished work.
        gc.collect()
        dist.destroy_process_group()


def release_device_memory() -> None:
    """Return what finished work held to the device: collect unreachable objects (a policy in a
    reference cycle), then hand PyTorch's cached CUDA blocks back to the driver, so that the next
    stage's policy and vLLM's ``gpu_memory_utilization`` share see the memory as free (vLLM
    sizes its KV cache from what the driver reports)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def barrier() -> None:
    """Synchronise all ranks; no-op without a multi-rank process group."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_data_parallel(tensor: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """``tensor`` summed (or maxed) over the data-parallel ranks, as a new tensor on the input's
    device; the tensor itself for one rank or an empty tensor. NCCL groups reduce a CUDA copy."""
    group = _dp_group()
    if not _initialized() or data_parallel_size() == 1 or tensor.numel() == 0:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else tensor.device
    out = tensor.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return out.to(tensor.device)


def _world_flag(flag: bool, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> bool:
    value = 1 if flag else 0
    if not _initialized() or dist.get_world_size(group) == 1:
        return bool(value)
    # NCCL reduces CUDA tensors only; one int costs nothing next to the step that asks.
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    reduced = torch.tensor([value], dtype=torch.int32, device=device)
    dist.all_reduce(reduced, op=op, group=group)
    return bool(reduced.item())


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``flag`` holds on any rank of ``group`` (default: the world, model-parallel peers
    included), on every rank of it. A collective: they all call it at the same point; none
    without a process group."""
    return _world_flag(flag, dist.ReduceOp.MAX, group)


def every_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``flag`` holds on every rank of ``group`` (default: the world), on every rank of
    it (a collective, as :func:`any_rank`)."""
    return _world_flag(flag, dist.ReduceOp.MIN, group)


def ranks_where(flag: bool) -> list[int]:
    """The world ranks on which ``flag`` holds, on every rank (a collective over the world, as
    :func:`any_rank`; ``[0]`` or ``[]`` without a process group). For error messages that name
    the rank at fault, so it is called on the failure path only."""
    if not _initialized() or dist.get_world_size() == 1:
        return [0] if flag else []
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    marks = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    marks[dist.get_rank()] = int(flag)
    dist.all_reduce(marks)
    return [r for r, mark in enumerate(marks.tolist()) if mark]


def all_gather_objects(items: list) -> list:
    """Concatenate every data-parallel rank's ``items`` (rank order); the list itself for one."""
    if not _initialized() or data_parallel_size() == 1:
        return items
    gathered: list[list] = [[] for _ in range(data_parallel_size())]
    dist.all_gather_object(gathered, items, group=_dp_group())
    return [item for part in gathered for item in part]


def shard(items: list, *, drop_remainder: bool = False) -> list:
    """This data-parallel rank's share of ``items``: every n-th element from its rank.

    drop_remainder: first trim to a multiple of the data-parallel size, so all ranks get equal
    shares (needed where ranks must run the same number of collective steps, e.g. backward).
    """
    n = data_parallel_size()
    if drop_remainder:
        items = items[: len(items) - len(items) % n]
    return items[data_parallel_rank() :: n]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (if installed) and torch (CPU and all CUDA devices).

    Ranks get the same seed; add ``rank()`` yourself where streams must differ.
    """
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)  # only affects subprocesses
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure the root logger: rank 0 logs at ``level``, other ranks at WARNING or above.

    Replaces existing root handlers so repeated calls don't duplicate lines.
    """
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}")
        level = resolved
    effective = level if is_rank0() else max(level, logging.WARNING)
    tag = f" [rank{rank()}]" if world_size() > 1 else ""
    logging.basicConfig(
        level=effective,
        format=f"%(asctime)s %(levelname).1s{tag} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
