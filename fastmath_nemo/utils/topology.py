"""How many ranks a configuration runs on and how they are grouped, before any process group
exists (validation, the memory plan, the vLLM engines' layout)."""

from __future__ import annotations

import os

from fastmath_nemo.config.schema import Config, PolicyBackend


def world_size_for(cfg: Config) -> int:
    """The ranks to check and plan for: ``run.plan_world_size`` in plan mode when set, else the
    launcher's WORLD_SIZE (1 outside torchrun)."""
    if cfg.run.plan and cfg.run.plan_world_size is not None:
        return cfg.run.plan_world_size
    return int(os.environ.get("WORLD_SIZE", "1"))


def trainer_tensor_parallel_size(cfg: Config) -> int | None:
    """Ranks per trainer TP group: the megatron policy's ``tensor_parallel_size``; None for the
    PyTorch policy, which is not model-parallel."""
    return cfg.policy.megatron.tensor_parallel_size if cfg.policy.backend == PolicyBackend.megatron else None


def vllm_tensor_parallel_size(cfg: Config) -> int:
    """Ranks per vLLM engine: ``generation.vllm.tensor_parallel_size``, or when null the megatron
    policy's TP size (one engine per TP group), 1 with the torch policy."""
    if cfg.generation.vllm.tensor_parallel_size is not None:
        return cfg.generation.vllm.tensor_parallel_size
    return trainer_tensor_parallel_size(cfg) or 1
