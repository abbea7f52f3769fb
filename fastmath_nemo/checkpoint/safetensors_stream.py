"""A Hugging Face safetensors folder written one tensor at a time.

A sharded policy hands its weights over one full tensor at a time (``export_weights``);
``safetensors.torch.save_file`` needs every tensor of a file in memory at once, which at 14B
means a 29.5 GB copy of the model on the writing rank. The safetensors format allows better:
a file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype,
shape and ``data_offsets`` (relative to the end of the header), then the raw little-endian
bytes, contiguous in offset order. With the names, dtypes and shapes known in advance (a model
built on the meta device gives them), the headers are written first and each tensor's bytes
are written to their place as the tensor arrives: the writer holds no tensor at all.

Files of at most ``max_shard_bytes`` (transformers' 5 GB default), named and indexed as
``save_pretrained`` names them (``model.safetensors``, or ``model-00001-of-00004.safetensors``
plus ``model.safetensors.index.json``), so transformers, vLLM and ``safe_open`` read them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' max_shard_size="5GB"


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor of the folder will be: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsStreamWriter:
    """Write the tensors of ``layout`` into ``folder`` in any order, one :meth:`write` each,
    then :meth:`close` (which checks that every tensor came, and writes the index)."""

    def __init__(self, folder: Path, layout: Sequence[TensorSpec], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None) -> None:
        if len({spec.name for spec in layout}) != len(layout):
            raise ValueError("a tensor name appears twice in the layout")
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in layout:  # in layout order, a new file when the next tensor would overflow
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        count = len(shards)
        names = ["model.safetensors"] if count == 1 else \
            [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.folder = Path(folder)
        self._files: list[BinaryIO] = []
        self._place: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (file, absolute offset, spec)
        self._weight_map = {}
        for index, (name, specs) in enumerate(zip(names, shards)):
            header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
            offset = 0
            for spec in specs:
                header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                                     "data_offsets": [offset, offset + spec.nbytes]}
                offset += spec.nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            handle = (self.folder / name).open("wb")
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            handle.truncate(8 + len(encoded) + offset)
            self._files.append(handle)
            start = 8 + len(encoded)
            for spec in specs:
                begin, _end = header[spec.name]["data_offsets"]  # type: ignore[index]
                self._place[spec.name] = (index, start + begin, spec)
                self._weight_map[spec.name] = name
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (any device) to its place; its dtype and shape must be the layout's."""
        if name not in self._place:
            raise KeyError(f"{name} is not in the layout")
        if name in self._written:
            raise ValueError(f"{name} was written already")
        index, offset, spec = self._place[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the layout says "
                             f"{spec.dtype} {spec.shape}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        handle = self._files[index]
        handle.seek(offset)
        handle.write(memoryview(data))
        self._written.add(name)

    def close(self) -> None:
        """Flush the files; ValueError if a tensor of the layout was never written."""
        for handle in self._files:
            handle.flush()
            handle.close()
        missing = sorted(set(self._place) - self._written)
        if missing:
            raise ValueError(f"{len(missing)} tensors of the layout were not written: {missing[:5]}")
        if len(self._files) > 1:
            total = sum(spec.nbytes for _, _, spec in self._place.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self._weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
