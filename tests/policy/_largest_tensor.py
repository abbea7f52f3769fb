"""``LargestTensor``: records the largest tensor any op produces (forward and backward).

A ``TorchDispatchMode`` sees every aten op's outputs, including those of fused kernels
(SDPA's flash kernel) and of autograd's backward, so a test can assert that no op ever
materialised, say, ``[T, T]`` scores or ``[N, V]`` logits. Counts elements, not bytes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.op = ""
        self.shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), str(func), tuple(t.shape)
        return out
