"""planning.host: a checkpoint's bytes per rank and host memory per node, by hand."""

from __future__ import annotations

from fastmath_nemo.planning.host import checkpoint_bytes_per_rank, host_needs
from fastmath_nemo.planning.memory import Layout, ModelShape, Precision

# 2 layers, hidden 8, 2 heads of 4 (KV heads 1), MLP 16, vocabulary 10, untied, no bias:
# a layer holds 8*8 + 2*8*4 + 8*8 + 3*8*16 = 576 sharded and 2*8 = 16 replicated parameters
SHAPE = ModelShape(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10, qkv_bias=False)


def test_the_pytorch_backend_writes_everything_from_rank_0() -> None:
    # 2 x 592 + 80 (embedding) + 80 (head) + 8 (final norm) = 1,352 parameters x (4 + 8) bytes
    assert SHAPE.total_params() == 1352
    assert checkpoint_bytes_per_rank(SHAPE, Layout(world=2), Precision.torch("float32"), megatron=False) == 1352 * 12


def test_megatron_ranks_write_their_share_of_their_shards() -> None:
    # TP 2: layers 2 x (576 / 2 + 16) = 608, embedding and head 10 x 8 / 2 = 40 each, final norm 8:
    # 696 per rank x (2 + 12) bytes, split over DP 2
    layout, precision = Layout(world=4, tp=2), Precision.megatron("bfloat16")
    assert checkpoint_bytes_per_rank(SHAPE, layout, precision, megatron=True) == 696 * 14 // 2
    needs = host_needs(SHAPE, layout, precision, megatron=True, ranks_per_node=8, reference=True,
                       vllm_offload_tp=2, async_save=True)
    assert needs.items == {
        "KL reference (host copy of the weights + staging)": 4 * 696 * 2 * 2,  # 4 ranks on the node
        "vLLM weights offloaded while training": 4 * 1352 * 2 // 2,
        "asynchronous checkpoint, staged": 4 * 696 * 14 // 2,
        "Hugging Face folder: one full tensor (rank 0)": 10 * 8 * 2,
    }
    assert needs.checkpoint_total == 4 * 696 * 14 // 2
