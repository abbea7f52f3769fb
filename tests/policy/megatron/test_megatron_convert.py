"""HF <-> megatron weight conversion: layouts and bit-exact round trips (no process group)."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _megatron_tiny import MODEL_TYPES, tiny_hf_model  # noqa: E402

from fastmath_nemo.policy.megatron.convert import (  # noqa: E402
    hf_to_mcore,
    mcore_to_hf,
    padded_vocab_size,
    te_names,
)

pytestmark = pytest.mark.megatron


def _hf_state(model_type: str, **overrides) -> tuple[dict[str, torch.Tensor], object]:
    hf = tiny_hf_model(model_type, **overrides)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        del state["lm_head.weight"]  # what save_pretrained writes for a tied model
    return state, hf.config


def _round_trip(state, cfg, tp: int, pp: int) -> tuple[dict, list[list[dict]]]:
    stages = [
        [hf_to_mcore(state, cfg, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp) for t in range(tp)] for p in range(pp)
    ]
    back: dict[str, torch.Tensor] = {}
    for p, shards in enumerate(stages):
        back.update(mcore_to_hf(shards, cfg, pp_rank=p, pp_size=pp))
    return back, stages


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_is_bit_exact(model_type: str, tp: int, pp: int) -> None:
    state, cfg = _hf_state(model_type)
    back, _ = _round_trip(state, cfg, tp, pp)
    assert back.keys() == state.keys()
    for key in state:
        assert torch.equal(back[key], state[key]), key


def test_shard_names_and_shapes_at_tp2() -> None:
    """A qwen2 TP=2 rank's names and shard shapes (load_hf_weights, in test_megatron_model and
    the torchrun worker, checks the names against GPTModel.state_dict() strictly)."""
    state, cfg = _hf_state("qwen2")
    shard = hf_to_mcore(state, cfg, tp_rank=1, tp_size=2, pp_rank=0, pp_size=1)
    layer = "decoder.layers.1."
    d, hidden, ffn = 16, 64, 128
    expected = {
        "embedding.word_embeddings.weight": (48, hidden),
        layer + "input_layernorm.weight": (hidden,),
        layer + "self_attention.linear_qkv.weight": ((2 + 2) * d * 1, hidden),  # 1 group: 2 q, k, v
        layer + "self_attention.linear_qkv.bias": ((2 + 2) * d,),
        layer + "self_attention.linear_proj.weight": (hidden, 2 * d),
        layer + "pre_mlp_layernorm.weight": (hidden,),
        layer + "mlp.linear_fc1.weight": (2 * ffn // 2, hidden),
        layer + "mlp.linear_fc2.weight": (hidden, ffn // 2),
        "decoder.final_layernorm.weight": (hidden,),
        "output_layer.weight": (48, hidden),
    }
    for key, shape in expected.items():
        assert tuple(shard[key].shape) == shape, key
    assert len(shard) == 2 + 2 * 7 + 1  # embedding, 2 layers x 7, final norm, output


def test_qkv_is_group_interleaved_and_fc1_is_gate_then_up() -> None:
    """TP rank r holds query group r: [its 2 q heads; its k head; its v head]; fc1 [gate_r; up_r]."""
    state, cfg = _hf_state("llama")
    d, attn, mlp = 16, "model.layers.0.self_attn.", "model.layers.0.mlp."
    for rank in range(2):
        shard = hf_to_mcore(state, cfg, tp_rank=rank, tp_size=2, pp_rank=0, pp_size=1)
        qkv = shard["decoder.layers.0.self_attention.linear_qkv.weight"]
        q_heads = state[attn + "q_proj.weight"][rank * 2 * d : (rank + 1) * 2 * d]
        k_head = state[attn + "k_proj.weight"][rank * d : (rank + 1) * d]
        v_head = state[attn + "v_proj.weight"][rank * d : (rank + 1) * d]
        assert torch.equal(qkv, torch.cat([q_heads, k_head, v_head]))
        fc1 = shard["decoder.layers.0.mlp.linear_fc1.weight"]
        half = slice(rank * 64, (rank + 1) * 64)
        assert torch.equal(fc1, torch.cat([state[mlp + "gate_proj.weight"][half], state[mlp + "up_proj.weight"][half]]))


def test_pipeline_stages_split_layers_and_tied_head() -> None:
    """PP=2 on a tied Qwen3: stage 1 holds layer 1 as its local layer 0, the final norm and a copy
    of the embedding as output_layer; stage 0 holds no output layer."""
    state, cfg = _hf_state("qwen3")
    first = hf_to_mcore(state, cfg, tp_rank=0, tp_size=1, pp_rank=0, pp_size=2)
    last = hf_to_mcore(state, cfg, tp_rank=0, tp_size=1, pp_rank=1, pp_size=2)
    assert "output_layer.weight" not in first and "decoder.final_layernorm.weight" not in first
    assert "embedding.word_embeddings.weight" not in last
    assert torch.equal(last["output_layer.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(
        last["decoder.layers.0.self_attention.q_layernorm.weight"], state["model.layers.1.self_attn.q_norm.weight"]
    )
    assert not any(k.startswith("decoder.layers.1.") for k in last)


def test_vocab_padding_for_tp_is_zero_rows_and_dropped_back() -> None:
    state, cfg = _hf_state("qwen2", vocab_size=95)
    assert padded_vocab_size(95, 2) == 96
    back, stages = _round_trip(state, cfg, tp=2, pp=1)
    last = stages[0][1]
    assert last["embedding.word_embeddings.weight"].shape == (48, 64)
    assert torch.equal(last["output_layer.weight"][-1], torch.zeros(64))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_te_names_rename_the_fused_pre_norms_both_ways() -> None:
    state, cfg = _hf_state("llama")
    local = hf_to_mcore(state, cfg, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    te = te_names(local)
    assert "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in te
    assert "decoder.final_layernorm.weight" in te
    assert te_names(te, to_te=False).keys() == local.keys()
