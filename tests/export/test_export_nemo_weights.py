"""The ``weights/`` half of a NeMo 2 checkpoint, read back without NeMo: files, metadata.json,
common.pt's content_metadata, ``module.``-prefixed Transformer Engine keys with layers stacked
on a leading axis, and every tensor against the source Hugging Face weights. (The whole
checkpoint against NeMo itself: tests/export/test_export_nemo.py, in .ci/nemo_export.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _hf_folders import safetensors_state, write_hf_folder  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from fastmath_nemo.preflight import ConfigError, load_config  # noqa: E402

pytestmark = pytest.mark.megatron

L = "module.decoder.layers."


def _expected(hf: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """NeMo's keys and global tensors, built here from the HF tensors by hand."""
    nh, ng, d = cfg.num_attention_heads, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layers = range(cfg.num_hidden_layers)

    def stack(fn) -> torch.Tensor:
        return torch.stack([fn(f"model.layers.{i}.") for i in layers])

    def qkv(p: str, kind: str) -> torch.Tensor:  # per query group: its q heads, its k head, its v head
        q, k, v = (hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
        groups = [torch.cat([q[g * nh // ng * d:(g + 1) * nh // ng * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                  for g in range(ng)]
        return torch.cat(groups)

    out = {
        "module.embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "module.decoder.final_layernorm.weight": hf["model.norm.weight"],
        L + "self_attention.linear_qkv.layer_norm_weight": stack(lambda p: hf[p + "input_layernorm.weight"]),
        L + "self_attention.linear_qkv.weight": stack(lambda p: qkv(p, "weight")),
        L + "self_attention.linear_proj.weight": stack(lambda p: hf[p + "self_attn.o_proj.weight"]),
        L + "mlp.linear_fc1.layer_norm_weight": stack(lambda p: hf[p + "post_attention_layernorm.weight"]),
        L + "mlp.linear_fc1.weight": stack(lambda p: torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                                 hf[p + "mlp.up_proj.weight"]])),
        L + "mlp.linear_fc2.weight": stack(lambda p: hf[p + "mlp.down_proj.weight"]),
    }
    if "lm_head.weight" in hf:
        out["module.output_layer.weight"] = hf["lm_head.weight"]
    if cfg.model_type == "qwen2":
        out[L + "self_attention.linear_qkv.bias"] = stack(lambda p: qkv(p, "bias"))
    if cfg.model_type == "qwen3":
        out[L + "self_attention.q_layernorm.weight"] = stack(lambda p: hf[p + "self_attn.q_norm.weight"])
        out[L + "self_attention.k_layernorm.weight"] = stack(lambda p: hf[p + "self_attn.k_norm.weight"])
    return out


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])  # QKV bias, untied; QK norm, head_dim 32, tied
def test_nemo_weights_layout_and_tensors(model_type: str, tmp_path: Path, one_thread) -> None:
    from megatron.core import dist_checkpointing

    from fastmath_nemo.export.megatron import save_weights
    from fastmath_nemo.export.nemo import CONTENT_METADATA, PREFIX
    from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel, init_model_parallel

    source = write_hf_folder(model_type, tmp_path / "hf")
    weights = tmp_path / "nemo" / "weights"
    save_weights(source, weights, dtype=torch.float32, prefix=PREFIX, content_metadata=dict(CONTENT_METADATA))

    assert {p.name for p in weights.iterdir()} >= {".metadata", "common.pt", "metadata.json"}
    assert any(p.suffix == ".distcp" for p in weights.iterdir())
    assert json.loads((weights / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}
    common = torch.load(weights / "common.pt", weights_only=False)
    assert common == {"content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                                           "distrib_optim_sharding_type": "dp_reshardable"}}  # as llm.import_ckpt

    cfg = AutoConfig.from_pretrained(str(source))
    expected = _expected(safetensors_state(source), cfg)
    init_model_parallel(1, 1, seed=0)  # megatron's readers need a process group (a world of one)
    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(weights))
        tensors = dist_checkpointing.load_plain_tensors(str(weights))
    finally:
        destroy_model_parallel()
    assert set(metadata) == set(expected)  # tensors only: the _extra_state objects are not tensors
    for key, tensor in expected.items():
        assert tensors[key].shape == tensor.shape, key
        assert torch.equal(tensors[key], tensor), key
    assert tensors[L + "self_attention.linear_qkv.weight"].shape[0] == cfg.num_hidden_layers


@pytest.mark.skipif(importlib.util.find_spec("nemo") is not None, reason="NeMo is installed here")
def test_nemo_format_without_nemo_fails_at_start_up() -> None:
    with pytest.raises(ConfigError, match=r"config key 'export.format': nemo writes context/ with NeMo itself.*"
                                          r"pip install -e '\.\[nemo\]'"):
        load_config("export", ["export.format=nemo"])
