"""The memory estimator against numbers derived by hand from the architecture (the
derivations are written out here, not computed by the estimator's own helpers)."""

from __future__ import annotations

import pytest

from fastmath_nemo.planning import memory as m

R1_14B = m.BUILTIN_SHAPES["DeepSeek-R1-Distill-Qwen-14B"]

# One decoder layer of the 14B model, unsharded (h = 5120, a d = 5120, g = 8 x 128 = 1024, I = 13824):
#   q 5120*5120 + bias 5120, k and v 5120*1024 + bias 1024 each, o 5120*5120, MLP 3*5120*13824
LAYER_MATRICES = 5120 * 5120 + 5120 + 2 * (5120 * 1024 + 1024) + 5120 * 5120 + 3 * 5120 * 13824
assert LAYER_MATRICES == 275_258_368
NORMS = 2 * 5120  # two RMSNorm scales per layer, replicated over TP ranks


def test_total_parameters_of_the_14b_model() -> None:
    # 48 layers + embedding and untied output layer (152064 x 5120 each) + final norm
    expected = 48 * (LAYER_MATRICES + NORMS) + 2 * 152064 * 5120 + 5120
    assert expected == 14_770_033_664  # DeepSeek-R1-Distill-Qwen-14B: "14.8B"
    assert R1_14B.total_params() == expected


def test_static_memory_at_tp8_dp1_with_the_distributed_optimizer() -> None:
    # per rank: matrices / 8, norms whole; 152064 / 8 = 19008 vocabulary rows per rank
    params = 48 * (LAYER_MATRICES // 8 + NORMS) + 2 * 19008 * 5120 + 5120
    assert params == 1_846_688_768
    static = m.static_bytes(R1_14B, m.Layout(world=8, tp=8, sequence_parallel=True), m.Precision.megatron("bfloat16"),
                            distributed_optimizer=True)
    assert static == {
        "weights": 3_693_377_536,       # params x 2 (bf16)
        "gradients": 7_386_755_072,     # params x 4 (megatron's fp32 gradient buffer)
        "optimizer": 22_160_265_216,    # params x 12 (fp32 main weights, Adam m and v); DP = 1: no sharding
    }


def test_static_memory_at_tp4_dp2_shards_the_optimizer_over_data_parallel_ranks() -> None:
    params = 48 * (LAYER_MATRICES // 4 + NORMS) + 2 * 38016 * 5120 + 5120
    assert params == 3_692_880_896
    layout = m.Layout(world=8, tp=4, sequence_parallel=True)
    sharded = m.static_bytes(R1_14B, layout, m.Precision.megatron("bfloat16"), distributed_optimizer=True)
    whole = m.static_bytes(R1_14B, layout, m.Precision.megatron("bfloat16"), distributed_optimizer=False)
    assert sharded["optimizer"] == params * 12 // 2 == 22_157_285_376
    assert whole["optimizer"] == params * 12 == 44_314_570_752
    assert sharded["weights"] == whole["weights"] == params * 2


def test_pipeline_parallel_rank_holds_half_the_layers_and_one_vocabulary_table() -> None:
    # PP = 2, TP = 1: the first stage has 24 layers + embedding, the last 24 layers + output + final norm
    last = 24 * (LAYER_MATRICES + NORMS) + 152064 * 5120 + 5120
    assert m.params_per_rank(R1_14B, m.Layout(world=2, pp=2)) == last


def test_torch_backend_keeps_fp32_weights_and_adamw_states() -> None:
    static = m.static_bytes(R1_14B, m.Layout(world=1), m.Precision.torch("bfloat16"), distributed_optimizer=False)
    # 16 bytes per parameter: the "about 224 GB" of issue 9 is 14B x 16
    assert sum(static.values()) == 14_770_033_664 * 16


TINY = m.ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000)


def test_activations_of_a_tiny_shape_by_hand() -> None:
    # per token per layer (elements): 4h = 256 (norm inputs and outputs), 2 a d = 128 (q, attention
    # output), 2 g = 64 (k, v), 3 I = 384 (SwiGLU input and output): 832; bf16 = 2 bytes; 100 tokens
    layer = 2 * 100 * 832
    assert m.layer_activation_bytes(TINY, m.Layout(world=1), 100, 2) == layer == 166_400
    assert m.activation_bytes(TINY, m.Layout(world=1), 100, 2, recompute=False) == 2 * layer
    # full recomputation: each layer's input (h per token) + one layer rebuilt in its backward
    assert m.activation_bytes(TINY, m.Layout(world=1), 100, 2, recompute=True) == 2 * (2 * 100 * 64) + layer
    # TP = 2 with SP: everything is split; without SP the 4h norm terms stay whole
    assert m.layer_activation_bytes(TINY, m.Layout(world=2, tp=2, sequence_parallel=True), 100, 2) == 200 * (128 + 288)
    assert m.layer_activation_bytes(TINY, m.Layout(world=2, tp=2), 100, 2) == 200 * (256 + 288)
    # CP = 2: each rank holds half of the tokens
    assert m.layer_activation_bytes(TINY, m.Layout(world=2, cp=2), 100, 2) == layer // 2
    # PP = 2 under 1F1B: 1 layer per stage, 2 micro-batches in flight on the first stage
    assert m.activation_bytes(TINY, m.Layout(world=2, pp=2), 100, 2, recompute=False) == 2 * layer


def test_dense_packed_attention_adds_a_quadratic_term() -> None:
    # one row of 100 tokens: a 100 x 100 bool mask + one layer's fp32 scores for 4 heads
    dense = m.activation_bytes(TINY, m.Layout(world=1), 100, 2, recompute=False, dense_rows=1, row_tokens=100)
    assert dense - m.activation_bytes(TINY, m.Layout(world=1), 100, 2, recompute=False) == 100 * 100 * (1 + 4 * 4)


def test_sft_activations_of_the_14b_model_at_24000_tokens() -> None:
    layout = m.Layout(world=8, tp=4, sequence_parallel=True)
    inputs = 48 * 2 * 24000 * 5120 // 4                                   # 2,949,120,000
    rebuilt = 2 * 24000 * (4 * 5120 // 4 + (2 * 5120 + 2 * 1024 + 3 * 13824) // 4)  # 890,880,000
    assert m.activation_bytes(R1_14B, layout, 24000, 2, recompute=True) == inputs + rebuilt == 3_840_000_000


def test_chunked_logprob_buffer_against_full_logits() -> None:
    layout = m.Layout(world=8, tp=4, sequence_parallel=True)
    hidden = 2 * 24000 * 5120 // 4  # the output layer's input, sequence-sharded
    grad = 4 * 38016 * 5120  # the output layer's fp32 weight gradient on this rank
    # 38016 vocabulary entries per TP rank; bf16 logits + two fp32 buffers = 10 bytes each
    assert m.logprob_bytes(R1_14B, layout, 24000, 4096, 2) == hidden + 4096 * 38016 * 10 + grad == 2_397_143_040
    assert m.logprob_bytes(R1_14B, layout, 24000, 0, 2) == hidden + 24000 * 38016 * 10 + grad == 9_963_847_680
    assert m.logprob_bytes(R1_14B, layout, 1000, 4096, 2) == 2 * 1000 * 5120 // 4 + 1000 * 38016 * 10 + grad


def test_vllm_kv_cache_tokens() -> None:
    # TP 4: weights 14,770,033,664 x 2 / 4 bytes per rank; KV per token 2 x 48 x 1024 x 2 / 4 = 49,152 bytes
    share = 24 * m.GIB
    expected = (share - 14_770_033_664 * 2 / 4) // 49_152
    assert m.vllm_kv_tokens(R1_14B, share, 4) == int(expected)
    assert m.vllm_kv_tokens(R1_14B, 4 * m.GIB, 4) == 0  # the weight shard alone does not fit


@pytest.mark.parametrize("tp", [1, 3, 7])
def test_padded_vocabulary_is_a_multiple_of_tp(tp: int) -> None:
    assert m.padded_vocab(152064, tp) % tp == 0 and 0 <= m.padded_vocab(152064, tp) - 152064 < tp
