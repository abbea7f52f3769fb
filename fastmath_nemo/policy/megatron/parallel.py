"""Process groups for the megatron backend: torch.distributed plus megatron's TP/PP groups.

Under torchrun the usual env vars (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK)
drive the process group; without them a single-process world is created on a free local
port, so TP=PP=1 works in a plain Python process (tests, notebooks).
"""

from __future__ import annotations

import math
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from fastmath_nemo.policy.megatron.cpu_compat import enable_cpu_compat
from fastmath_nemo.utils.distributed import distributed_timeout, set_data_parallel_group

_owns_process_group = False


def check_layout(
    num_heads: int, num_kv_heads: int, num_layers: int, world_size: int, tp: int, pp: int, cp: int = 1
) -> None:
    """Raise ValueError naming the first constraint the parallel layout breaks."""
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_heads % tp:
        raise ValueError(f"num_attention_heads ({num_heads}) must be divisible by tensor parallel size tp ({tp})")
    if num_kv_heads % tp:
        raise ValueError(f"num_key_value_heads ({num_kv_heads}) must be divisible by tensor parallel size tp ({tp})")
    if num_layers % pp:
        raise ValueError(f"num_hidden_layers ({num_layers}) must be divisible by pipeline parallel size pp ({pp})")
    if world_size % (tp * pp * cp):
        raise ValueError(
            f"world size ({world_size}) must be divisible by tp * pp * cp ({tp} * {pp} * {cp} = {tp * pp * cp})"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _init_process_group() -> None:
    """gloo on CPU, nccl on GPU (bound to LOCAL_RANK's device first)."""
    global _owns_process_group
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", timeout=distributed_timeout())
    else:
        # A world of one on a fresh port, passed directly: setting MASTER_PORT in the
        # environment would leak into child processes, which then collide on the port.
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1, timeout=distributed_timeout())
    _owns_process_group = True


def init_model_parallel(tp: int, pp: int, seed: int, cp: int = 1) -> None:
    """Initialise torch.distributed (if needed), megatron's TP x CP x PP groups and its RNG tracker.

    Idempotent for the same (tp, pp, cp); a different layout tears the old groups down first.
    ``seed`` seeds megatron's tracked RNG states (data-parallel, TP-rank-offset model-parallel
    and expert streams) via ``model_parallel_cuda_manual_seed``; on the CPU through
    ``cpu_compat``, which maps the "CUDA" generator to the CPU one, so there it also re-seeds
    torch's global CPU generator with ``seed``.
    """
    enable_cpu_compat()
    if not dist.is_initialized():
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()  # groups of a process group torn down since
        _init_process_group()
    world_size = dist.get_world_size()
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size ({world_size}) must be divisible by tp * pp * cp ({tp} * {pp} * {cp})")
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and parallel_state.get_context_parallel_world_size() == cp
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        timeout = distributed_timeout()  # run.distributed_timeout_s, in megatron's whole minutes
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
            **({"distributed_timeout_minutes": math.ceil(timeout.total_seconds() / 60)} if timeout else {}),
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Drop megatron's groups; also the process group if :func:`init_model_parallel` made it."""
    global _owns_process_group
    set_data_parallel_group(None)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False
