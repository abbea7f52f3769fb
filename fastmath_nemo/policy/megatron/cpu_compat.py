"""megatron-core (0.16.1 to 0.19.2) on the CPU with gloo: the only CUDA redirections.

megatron-core assumes a GPU in a few places that a CPU model walks through. Each is redirected
here and nowhere else. Mostly inside megatron's own modules: their global name ``torch`` is
replaced by :class:`_TorchOnCpu`, a proxy that forwards everything to the real ``torch`` except
a few ``torch.cuda`` calls and literal ``device="cuda"`` arguments; torch itself, transformers
and this project see no change. Each entry was found by running without it (TP=2 with and without
sequence parallelism, PP=2, CP=2, DP=2 under gloo; fp32 and bf16; forward, and a training step with megatron's DDP and optimizer).

Model and schedules (module ``torch`` proxied):

- ``tensor_parallel.random``: ``model_parallel_cuda_manual_seed`` and the RNG tracker
  (``get_cuda_rng_tracker().fork()`` around dropout, activation recompute) call
  ``torch.cuda.get_rng_state`` / ``manual_seed``: on the CPU the "CUDA" generator is the CPU
  generator, the one CPU dropout draws from. Its ``_set_cuda_rng_state`` is replaced too: it
  queues the set as a lazy CUDA callback, which a CPU build silently never runs (no error; the
  state is just never restored). ``fork()`` logs "CPU RNG state changed within GPU RNG context"
  whenever the block draws random numbers, which on the CPU is the point: a logging filter
  drops that one message.
- ``models.common.embeddings.rotary_pos_embedding``: ``RotaryEmbedding`` moves ``inv_freq`` to
  ``torch.cuda.current_device()`` on the first forward.
- ``models.common.embeddings.rope_utils``: under context parallelism each rank's rotary chunks
  are picked by an index built in pinned memory (``pin_memory=True``, dropped here).
- ``tensor_parallel.mappings``: TP all-gathers (``runtime_gather_output``, sequence parallel)
  allocate on ``current_device()``.
- ``tensor_parallel.layers``: under sequence parallelism the linears' backward allocates the
  reduce-scattered input gradient on ``current_device()``.
- ``utils``: ``GlobalMemoryBuffer`` (the unfused attention's score buffer) allocates on
  ``current_device()``.
- ``transformer.utils``: the unfused attention's default causal mask is
  ``torch.ones(s, s, device="cuda")`` (fused_softmax imports the function by name, but it still
  resolves ``torch`` in transformer.utils' globals).
- ``pipeline_parallel.p2p_communication``: PP receive buffers are allocated on
  ``current_device()``; batched send/recv ends in ``torch.cuda.synchronize()`` (a no-op here:
  CPU ops and waited gloo requests are complete), so ``batch_p2p_sync`` needs no change.
- ``pipeline_parallel.schedules``: the schedules count tokens in
  ``torch.zeros([], device="cuda")``.

Training (module ``torch`` proxied):

- ``distributed.param_and_grad_buffer``: DDP's grad buffers are allocated on ``current_device()``;
  megatron-core 0.19 also waits on ``torch.cuda.current_stream()`` before reducing gradients.
- ``optimizer.optimizer``, ``optimizer.clip_grads``: ``torch.tensor(..., device="cuda")`` scalars
  (loss scale, found-inf flag, grad norm). ``clip_grad_by_total_norm_fp32`` asserts every grad
  is a ``torch.cuda.FloatTensor``: optimizer.py's reference to it is replaced by the same
  scaling without the assertion.
- ``dist_checkpointing.strategies.filesystem_async``, ``...state_dict_saver``: a distributed
  checkpoint copies tensors to the host after ``torch.cuda.synchronize()`` and all-reduces its
  failure flag in a tensor on ``current_device()``; ``...async_utils`` (asynchronous saves) and
  ``...fully_parallel`` (the save split over data-parallel ranks) synchronize and all-reduce
  their flags the same way.
- ``optimizer.distrib_optimizer``: the distributed optimizer's checkpoint gathers its shards
  into buffers on ``current_device()``; its load allocates its state there.

Tensor methods, which no module proxy reaches (``Tensor.cuda()`` returns the tensor itself and
``Tensor.type()`` names a CPU tensor by its CUDA type, only while these methods run):

- ``LanguageModule.setup_embeddings_and_output_layer``: with tied embeddings and PP > 1 the
  first and last stages all-reduce the shared matrix after ``weight.data.cuda()``.
- ``Float16OptimizerWithFloat16Params.__init__`` (bf16) and ``DistributedOptimizer.__init__``
  accept only parameters whose ``type()`` is ``torch.cuda.{Float,Half,BFloat16}Tensor``.
- ``DistributedOptimizer.get_parameter_state_dp_zero`` (checkpoint save) sends each shard
  after ``send_tensor.cuda()``.
- ``get_pos_emb_on_this_cp_rank`` (as ``rotary_pos_embedding`` calls it) moves that index to
  the GPU with ``.cuda()``.

Not covered (not run here): CUDA graphs, overlapped grad reduce (CUDA streams).

:func:`enable_cpu_compat` is idempotent and does nothing at all when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from collections.abc import Iterator
from typing import Any

import torch

# Megatron modules whose global ``torch`` is replaced by the proxy (see the module docstring).
_PATCHED_MODULES = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    # distributed checkpoints: tensors are "preloaded" to the host after torch.cuda.synchronize();
    # asynchronous writes and the fully parallel save all-reduce their flags on current_device()
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
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

    @staticmethod
    def current_stream(device: Any = None) -> "_NoStream":
        return _NoStream()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _NoStream:
    """The CPU's one implicit "stream": everything already ran in order, so waits are no-ops."""

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None


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
    def tensor(*args: Any, device: Any = None, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        # pinned host memory (a staging buffer for a copy to the GPU) needs an accelerator
        return torch.tensor(*args, device=_on_cpu(device), **kwargs)


def _set_cuda_rng_state_on_cpu(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Replaces ``tensor_parallel.random._set_cuda_rng_state`` (a lazy CUDA callback that a CPU
    build never runs): sets the CPU generator now."""
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_fp32_on_cpu(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` without its assertion that every
    grad is a ``torch.cuda.FloatTensor``: scale the fp32 grads by ``max_norm / total_norm``."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in params if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            grad.mul_(clip_coeff)


@contextlib.contextmanager
def _cpu_tensors_pass_as_cuda() -> Iterator[None]:
    """Inside the block ``Tensor.cuda()`` returns the tensor itself and ``Tensor.type()`` names a
    CPU tensor as its CUDA type ("torch.cuda.FloatTensor"). Used around the few megatron methods
    that move or type-check tensors by these Tensor methods (a module proxy cannot reach them)."""
    cuda, type_ = torch.Tensor.cuda, torch.Tensor.type

    def type_as_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = type_(self, *args, **kwargs)
        if args or kwargs or not name.startswith("torch.") or self.is_cuda:
            return name
        return "torch.cuda." + name[len("torch."):]

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = type_as_cuda
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.type = cuda, type_


def _run_as_if_on_cuda(owner: Any, method: str) -> None:
    """Wrap ``owner.method`` in :func:`_cpu_tensors_pass_as_cuda`."""
    original = getattr(owner, method)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cpu_tensors_pass_as_cuda():
            return original(*args, **kwargs)

    setattr(owner, method, wrapped)


class _DropCpuRngWarning(logging.Filter):
    """On the CPU the tracked "GPU" generator *is* the CPU generator, so fork()'s check that
    the CPU state did not change inside the block fires on every dropout."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


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
    logging.getLogger(random.__name__).addFilter(_DropCpuRngWarning())
    rotary = importlib.import_module("megatron.core.models.common.embeddings.rotary_pos_embedding")
    _run_as_if_on_cuda(rotary, "get_pos_emb_on_this_cp_rank")
    language_module = importlib.import_module("megatron.core.models.common.language_module.language_module")
    _run_as_if_on_cuda(language_module.LanguageModule, "setup_embeddings_and_output_layer")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_on_cpu
    _run_as_if_on_cuda(optimizer.Float16OptimizerWithFloat16Params, "__init__")
    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    _run_as_if_on_cuda(distrib_optimizer.DistributedOptimizer, "__init__")
    _run_as_if_on_cuda(distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero")
    _enabled = True
    return True


def cpu_compat_enabled() -> bool:
    """Whether :func:`enable_cpu_compat` has installed the redirections in this process."""
    return _enabled
