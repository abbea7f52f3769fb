"""Run megatron-core 0.16.1 on the CPU (torch.distributed gloo): the only CUDA redirections.

megatron-core assumes a GPU in a few places that a CPU model still walks through. Each is
redirected here, and only inside megatron's own modules: a module's global name ``torch`` is
replaced by :class:`_TorchOnCpu`, a thin proxy that forwards everything to the real ``torch``
except ``torch.cuda.*`` calls and ``device="cuda"`` factory arguments. Nothing outside those
modules (torch itself, transformers, this project) sees a change.

============================================  ===============================================
megatron module (0.16.1)                       why it is redirected
============================================  ===============================================
``tensor_parallel.random``                     the RNG tracker (``model_parallel_cuda_manual_seed``,
                                               ``get_cuda_rng_tracker().fork()`` around dropout,
                                               activation recompute) reads and writes
                                               ``torch.cuda.get_rng_state`` / ``manual_seed`` and
                                               the CUDA default generator: they become the CPU
                                               generator, the one CPU dropout draws from.
``models.common.embeddings.rotary_pos_embedding``  ``RotaryEmbedding`` builds ``inv_freq`` on, and
                                               moves it to, ``torch.cuda.current_device()``.
``tensor_parallel.mappings``                   TP all-gathers (sequence parallel, gathered output)
                                               allocate on ``torch.cuda.current_device()``.
``pipeline_parallel.p2p_communication``        PP shape exchange and activation buffers are
                                               allocated on ``current_device()``, and every batched
                                               send/recv ends in ``torch.cuda.synchronize()`` (a
                                               no-op on the CPU, where ops are synchronous).
``pipeline_parallel.schedules``                the schedules count tokens in
                                               ``torch.zeros([], device="cuda")``.
``utils``                                      ``GlobalMemoryBuffer`` (the unfused attention's
                                               score buffer) allocates on ``current_device()``.
``transformer.utils`` / ``fusions.fused_softmax``  the unfused attention's default causal mask is
                                               ``torch.ones(s, s, device="cuda")`` (only when no
                                               mask is passed).
============================================  ===============================================

:func:`enable_cpu_compat` is idempotent and does nothing at all when CUDA is available.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch

# Megatron modules whose global ``torch`` is replaced by the proxy (see the table above).
_PATCHED_MODULES = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
)
_CPU = torch.device("cpu")
_enabled = False


def _on_cpu(device: Any) -> Any:
    """``"cuda"`` / ``"cuda:N"`` / ``torch.device("cuda")`` -> cpu; anything else unchanged."""
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return _CPU
    return device


class _CudaOnCpu(types.SimpleNamespace):
    """What megatron calls on ``torch.cuda``, answered for the CPU; the rest forwards."""

    @staticmethod
    def current_device() -> torch.device:
        # Megatron only passes the result on as ``device=`` / ``.to(...)``.
        return _CPU

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        # The "CUDA" generator of a CPU run is the CPU one (the tracker forks it around dropout).
        torch.manual_seed(seed)

    @staticmethod
    def synchronize(device: Any = None) -> None:
        # CPU ops (and gloo's waited requests) are already complete.
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _RandomOnCpu(types.SimpleNamespace):
    """``torch.cuda.random`` as ``tensor_parallel.random._get_cuda_rng_state`` uses it."""

    get_rng_state = staticmethod(_CudaOnCpu.get_rng_state)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda.random, name)


class _TorchOnCpu(types.ModuleType):
    """Stands in for ``torch`` inside one megatron module: CUDA calls and devices go to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu(random=_RandomOnCpu())

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    # Factories megatron calls with a literal ``device="cuda"``.
    @staticmethod
    def zeros(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*args, device=_on_cpu(device), **kwargs)

    @staticmethod
    def ones(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.ones(*args, device=_on_cpu(device), **kwargs)

    @staticmethod
    def empty(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.empty(*args, device=_on_cpu(device), **kwargs)

    @staticmethod
    def tensor(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.tensor(*args, device=_on_cpu(device), **kwargs)


def _set_cuda_rng_state_on_cpu(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Replaces ``tensor_parallel.random._set_cuda_rng_state``, which indexes
    ``torch.cuda.default_generators`` inside a lazy CUDA callback."""
    torch.set_rng_state(new_state)


def enable_cpu_compat() -> bool:
    """Install the CPU redirections into megatron-core (once). Returns True when installed.

    A no-op returning False when ``torch.cuda.is_available()``: GPU runs use megatron unchanged.
    Call it before building a model or seeding (``init_model_parallel`` does).
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    proxy = _TorchOnCpu()
    for name in _PATCHED_MODULES:
        importlib.import_module(name).torch = proxy

    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._set_cuda_rng_state = _set_cuda_rng_state_on_cpu
    # fused_softmax imports get_default_causal_mask by name, but the function still resolves
    # ``torch`` in transformer.utils' globals, which the proxy now covers.
    _enabled = True
    return True


def cpu_compat_enabled() -> bool:
    """Whether :func:`enable_cpu_compat` has installed the redirections in this process."""
    return _enabled
