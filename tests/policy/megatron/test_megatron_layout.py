"""Layout checks and the configurations the megatron backend refuses (clear ValueErrors)."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _megatron_tiny import tiny_hf_config  # noqa: E402

from fastmath_nemo.policy.megatron.config import rope_settings, transformer_config_from_hf  # noqa: E402
from fastmath_nemo.policy.megatron.layer_spec import gpt_layer_spec  # noqa: E402
from fastmath_nemo.policy.megatron.parallel import check_layout  # noqa: E402
from fastmath_nemo.policy.megatron.sdpa_attention import SDPAAttention  # noqa: E402

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
]


def test_check_layout_accepts_valid_layouts() -> None:
    check_layout(num_heads=4, num_kv_heads=2, num_layers=4, world_size=8, tp=2, pp=2, cp=2)
    check_layout(num_heads=4, num_kv_heads=2, num_layers=3, world_size=1, tp=1, pp=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_heads=6, num_kv_heads=2, num_layers=4, world_size=4, tp=4, pp=1), "num_attention_heads (6)"),
        (dict(num_heads=8, num_kv_heads=2, num_layers=4, world_size=4, tp=4, pp=1), "num_key_value_heads (2)"),
        (dict(num_heads=4, num_kv_heads=2, num_layers=3, world_size=2, tp=1, pp=2), "num_hidden_layers (3)"),
        (dict(num_heads=4, num_kv_heads=2, num_layers=4, world_size=6, tp=2, pp=2), "world size (6)"),
        (dict(num_heads=4, num_kv_heads=2, num_layers=4, world_size=4, tp=2, pp=1, cp=3), "tp * pp * cp"),
        (dict(num_heads=4, num_kv_heads=2, num_layers=4, world_size=4, tp=0, pp=1), "tp must be >= 1"),
    ],
)
def test_check_layout_names_the_broken_constraint(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="must be") as info:
        check_layout(**kwargs)
    assert message in str(info.value)


def test_transformer_config_fields() -> None:
    qwen3 = transformer_config_from_hf(tiny_hf_config("qwen3"), tp=1, params_dtype=torch.bfloat16, recompute=True)
    assert (qwen3.kv_channels, qwen3.num_query_groups, qwen3.qk_layernorm, qwen3.add_qkv_bias) == (32, 2, True, False)
    assert qwen3.bf16 and qwen3.params_dtype == torch.bfloat16 and qwen3.recompute_granularity == "full"
    qwen2 = transformer_config_from_hf(tiny_hf_config("qwen2"))
    assert qwen2.add_qkv_bias and not qwen2.add_bias_linear and qwen2.kv_channels == 16
    assert qwen2.normalization == "RMSNorm" and qwen2.layernorm_epsilon == 1e-6 and qwen2.gated_linear_unit
    assert qwen2.use_cpu_initialization == (not torch.cuda.is_available())
    assert rope_settings(tiny_hf_config("llama")).base == 500000.0


@pytest.mark.parametrize(
    ("model_type", "overrides", "message"),
    [
        ("qwen2", {"model_type": "mistral"}, "model_type 'mistral' is not supported"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ("qwen2", {"use_sliding_window": True}, "sliding-window"),
        ("llama", {"attention_bias": True}, "attention_bias=True"),
        ("llama", {"mlp_bias": True}, "mlp_bias=True"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_theta": 1e4}},
            "cannot be represented",
        ),
    ],
)
def test_unsupported_configs_raise(model_type: str, overrides: dict, message: str) -> None:
    cfg = tiny_hf_config(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with pytest.raises(ValueError) as info:
        transformer_config_from_hf(cfg)
    assert message in str(info.value)


def test_layer_specs() -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    def core(spec):
        return spec.submodules.self_attention.submodules.core_attention

    assert core(gpt_layer_spec("unfused", qk_layernorm=False)) is DotProductAttention
    assert core(gpt_layer_spec("sdpa", qk_layernorm=True)) is SDPAAttention
    with pytest.raises(ValueError, match="attention_backend"):
        gpt_layer_spec("flash", qk_layernorm=False)


def test_te_backend_without_transformer_engine_says_what_to_install() -> None:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("transformer_engine is importable here")
    with pytest.raises(ValueError, match="transformer-engine"):
        gpt_layer_spec("te", qk_layernorm=False)


def test_transformer_config_checks_the_layout() -> None:
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) must be divisible by tensor parallel size tp \(4\)"):
        transformer_config_from_hf(tiny_hf_config("qwen2"), tp=4)
    with pytest.raises(ValueError, match=r"num_hidden_layers \(2\)"):
        transformer_config_from_hf(tiny_hf_config("qwen2"), pp=4)
