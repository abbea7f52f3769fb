"""The pieces of context parallelism that need no process group (the CP=2 training step is in
test_megatron_policy_parallel.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

from fastmath_nemo.batching.documents import blocked_attention as local_attention_mask  # noqa: E402
from fastmath_nemo.batching.documents import blocked_attention as megatron_attention_mask  # noqa: E402
from fastmath_nemo.policy.megatron.context_parallel import _natural_order, local_positions  # noqa: E402


def test_local_positions_are_load_balanced_chunks_covering_the_row() -> None:
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    every = torch.cat([local_positions(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))
    assert torch.equal(every[_natural_order(24, 3, torch.device("cpu"))], torch.arange(24))
    with pytest.raises(ValueError, match="2 x 2"):
        local_positions(10, 2, 0)


def test_local_mask_is_the_full_masks_rows() -> None:
    document_ids = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    full = megatron_attention_mask(document_ids)
    for rank in range(2):
        mine = local_positions(8, 2, rank)
        assert torch.equal(local_attention_mask(document_ids, mine), full[:, :, mine])
