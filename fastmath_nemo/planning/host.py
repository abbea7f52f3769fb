"""What a run needs beside the GPUs: a checkpoint's size and write time, and host memory per node.

Pure arithmetic, as :mod:`fastmath_nemo.planning.memory` (``P_rank``, ``w``, ``o``, ``t p c D``
are its symbols). A resumable checkpoint of the megatron backend is every rank's shards of the
model and of the optimizer state (``policy/megatron/checkpointing.py``); what data- and
context-parallel peers hold alike is written by one of them each, so a rank writes::

    checkpoint bytes per rank = P_rank (w + o) / (D c)

The PyTorch backend's rank 0 writes the whole model and AdamW's states, ``P (4 + 8)``. At a
node's write bandwidth ``B`` the ``r`` ranks of a node take ``r x (bytes per rank) / B``.

Host memory per node, for ``r`` ranks:

- the KL reference (``grpo.beta > 0``): a host copy of each rank's weights plus a staging copy
  of the same size (megatron); the PyTorch backend keeps one copy;
- vLLM's weights, offloaded to the host while training (``generation.vllm.sleep_level=1``, on
  GPUs): each engine rank's bf16 shard, ``2 P / t_vllm``;
- an asynchronous checkpoint (``checkpoint.async_save``): what each rank writes, staged in
  host memory (on a CPU, the forked writer's copy-on-write pages);
- the Hugging Face folders (``final/``, kept GRPO candidates): rank 0 holds one full tensor at
  a time, the largest being the embedding ``V h w``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastmath_nemo.planning.memory import Layout, ModelShape, Precision, params_per_rank


@dataclass(frozen=True)
class HostNeeds:
    """Bytes of one node's host memory, per item, and the checkpoint figures."""

    items: dict[str, int]
    checkpoint_per_rank: int
    checkpoint_total: int


def checkpoint_bytes_per_rank(shape: ModelShape, layout: Layout, precision: Precision, megatron: bool) -> int:
    """What the busiest rank writes into a resumable checkpoint (the module docstring)."""
    if not megatron:
        return shape.total_params() * (precision.weight + precision.optimizer)
    peers = layout.dp * layout.cp
    return params_per_rank(shape, layout) * (precision.weight + precision.optimizer) // peers


def host_needs(shape: ModelShape, layout: Layout, precision: Precision, *, megatron: bool, ranks_per_node: int,
               reference: bool, vllm_offload_tp: int | None, async_save: bool) -> HostNeeds:
    """Host memory per node (items present only when the run uses them) and the checkpoint's size."""
    ranks = min(ranks_per_node, layout.world)
    per_rank_weights = params_per_rank(shape, layout) * precision.weight if megatron \
        else shape.total_params() * precision.weight
    written = checkpoint_bytes_per_rank(shape, layout, precision, megatron)
    items: dict[str, int] = {}
    if reference:
        items["KL reference (host copy of the weights" + (" + staging)" if megatron else ")")] = \
            ranks * per_rank_weights * (2 if megatron else 1)
    if vllm_offload_tp is not None:
        items["vLLM weights offloaded while training"] = ranks * shape.total_params() * 2 // vllm_offload_tp
    if async_save:
        items["asynchronous checkpoint, staged"] = (ranks if megatron else 1) * written
    items["Hugging Face folder: one full tensor (rank 0)"] = shape.vocab * shape.hidden * precision.weight
    total = written * (layout.world if megatron else 1)
    return HostNeeds(items, written, total)
