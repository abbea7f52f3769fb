"""How the megatron policy writes and reads its checkpoints.

Two kinds, for two uses:

- **Resumable** (``<stage>/checkpoints/step_N``): ``megatron/``, a megatron-core distributed
  checkpoint (``torch_dist``) of the model and optimizer shards. Every rank writes its own
  shards at once, and the shards that data-parallel peers hold alike are split among them
  (``FullyParallelSaveStrategyWrapper``): no rank gathers the model. It loads into another
  TP / PP / DP layout (the distributed optimizer over torch's Adam: another DP size only, see
  ``optimizer_state``); its weights alone load at any layout (``conf=export`` reads them at TP=1).
  With ``checkpoint.async_save`` the write goes on in a forked process (megatron-core's
  ``AsyncCallsQueue``: a copy-on-write snapshot of the host shards, staged from the GPU first)
  while training continues; it is complete once every rank's part is on disk and the
  ``metadata.json`` is written, which :class:`QueuedWrite` reports.
- **Weights** (``final/``, the GRPO stage's kept candidates): a Hugging Face folder, for the
  next stage, evaluation and vLLM. The full tensors come one at a time (``gather_hf_weights``)
  and rank 0 writes each to its place in the safetensors files as it comes
  (``checkpoint.safetensors_stream``): no rank holds more than one full tensor beyond its shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fastmath_nemo.checkpoint.safetensors_stream import SafetensorsStreamWriter, TensorSpec
from fastmath_nemo.utils.distributed import barrier, is_rank0

DISTRIBUTED_DIR = "megatron"


def write_hf_weights(weights: Iterable[tuple[str, torch.Tensor]], layout: list[TensorSpec], hf_config: Any,
                     directory: Path, *, writer_rank: bool) -> None:
    """Stream ``weights`` (every rank iterates them: a collective) into safetensors files in
    ``directory`` laid out as ``layout`` says, written by the rank with ``writer_rank``, plus
    its ``config.json``."""
    writer = SafetensorsStreamWriter(directory, layout) if writer_rank else None
    for name, tensor in weights:
        if writer is not None:
            writer.write(name, tensor)
    if writer is not None:
        writer.close()
        hf_config.save_pretrained(str(directory))


def is_distributed_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a resumable megatron checkpoint (``megatron/``) without Hugging
    Face weights beside it."""
    folder = Path(folder)
    return (folder / DISTRIBUTED_DIR).is_dir() and not any(folder.glob("*.safetensors"))


def distributed_dtype(folder: Path) -> torch.dtype:
    """The dtype the model's tensors were saved in, from the checkpoint's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(Path(folder) / DISTRIBUTED_DIR)).read_metadata()
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata) and not key.startswith("optimizer"):
            return entry.properties.dtype
    raise ValueError(f"{folder}: the distributed checkpoint holds no model tensor")


def _save_strategy() -> Any:
    """torch_dist, with the shards data-parallel peers hold alike written by one of them each."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


class QueuedWrite:
    """An asynchronous distributed-checkpoint write in flight (``CheckpointManager`` polls it)."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    def finished(self, wait: bool) -> bool:
        """Whether every rank's part is on disk and the checkpoint's metadata written; ``wait``:
        block until then. A collective: every rank calls it at the same point."""
        self._queue.maybe_finalize_async_calls(blocking=wait)
        return self._queue.get_num_unfinalized_calls() == 0


def write_distributed(sharded_state: dict[str, Any], directory: Path, queue: Any | None) -> QueuedWrite | None:
    """Write ``sharded_state`` into ``directory/megatron`` (a collective: every rank its part).
    With ``queue`` (an ``AsyncCallsQueue``) the write is scheduled there and a
    :class:`QueuedWrite` returned; else it is on disk when this returns."""
    from megatron.core import dist_checkpointing

    target = Path(directory) / DISTRIBUTED_DIR
    if is_rank0():
        target.mkdir()
    barrier()
    request = dist_checkpointing.save(sharded_state, str(target), sharded_strategy=_save_strategy(),
                                      async_sharded_save=queue is not None)
    if request is None:
        return None
    queue.schedule_async_request(request)
    return QueuedWrite(queue)


def read_distributed(sharded_state: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Load ``sharded_state`` from ``directory/megatron``, resharded to this run's layout."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state, str(Path(directory) / DISTRIBUTED_DIR))
