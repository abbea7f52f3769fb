"""Saving and loading megatron optimizer state through distributed checkpoints.

megatron-core builds its optimizers on Transformer Engine's or apex's fused Adam where one is
installed and on ``torch.optim.AdamW`` elsewhere (every CPU run, and GPU runs without TE).
Its distributed optimizer's checkpoint code is written for the fused ones, which keep the step
count in the parameter groups; torch's Adam keeps a ``step`` tensor per parameter, and with it
megatron-core 0.16.1:

- cannot describe the sharded state of an optimizer that has not stepped yet (it reads the
  step count from per-parameter state), so a fresh run cannot load a checkpoint:
  :func:`prepare_for_load` creates the state first;
- gives every parameter one shared ``step`` tensor when loading, which torch's Adam then
  increments once per parameter, and the distributed optimizer then overwrites its value with
  the step of the state that existed before the load (its bucket state holds no ``step``, so
  the load "restores" the in-memory one: a resume would restart Adam's bias correction):
  :func:`finish_load` gives each parameter its own copy of the saved step, which the loaded
  parameter groups carry;
- fails to load its ``fully_reshardable`` format (the ``step`` entry has no source), so
  :func:`checkpoint_metadata` picks ``dp_reshardable`` there: resumable at another
  data-parallel size, not at another TP / PP layout. With fused Adam the format is
  ``fully_reshardable`` (any layout). The non-distributed optimizer reshards either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def _torch_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron (possibly chained) optimizer."""
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield megatron_optimizer.optimizer


def _keeps_step_per_parameter(optimizer: Any) -> bool:
    return any(isinstance(inner, torch.optim.Adam | torch.optim.AdamW) for inner in _torch_optimizers(optimizer))


def checkpoint_metadata(optimizer: Any) -> dict[str, str]:
    """The ``metadata`` for ``optimizer.sharded_state_dict``: the distributed optimizer's format.

    ``fully_reshardable`` stores the canonical per-parameter layout (gathered over data-parallel
    ranks at save time) and loads into any TP / PP / DP layout; ``dp_reshardable`` stores each
    rank's buffers and loads at any data-parallel size."""
    kind = "dp_reshardable" if _keeps_step_per_parameter(optimizer) else "fully_reshardable"
    return {"distrib_optim_sharding_type": kind}


@torch.no_grad()
def prepare_for_load(optimizer: Any) -> None:
    """Create the state of every parameter that has none, without moving any weight: a step
    at lr = 0 and weight decay 0 on zero gradients (zero moments). The load replaces it all."""
    for inner in _torch_optimizers(optimizer):
        params = [p for group in inner.param_groups for p in group["params"] if not inner.state.get(p)]
        if not params:
            continue
        saved = [(group["lr"], group["weight_decay"]) for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
        for param in params:
            param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for group, (lr, weight_decay) in zip(inner.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, weight_decay


def finish_load(optimizer: Any) -> None:
    """Give every parameter its own ``step`` tensor (torch's Adam increments it in place),
    holding the saved step where the loaded parameter groups carry one."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            saved = group.get("step")
            for param in group["params"]:
                state = inner.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = (torch.full_like(state["step"], float(saved)) if saved is not None
                                     else state["step"].clone())
