"""Megatron GPTModel (TP=1, one process) against Hugging Face: same weights, same logits."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _megatron_tiny import MODEL_TYPES, packed_row, tiny_hf_model  # noqa: E402

from fastmath_nemo.batching.documents import blocked_attention as megatron_attention_mask  # noqa: E402
from fastmath_nemo.policy.megatron.config import transformer_config_from_hf  # noqa: E402
from fastmath_nemo.policy.megatron.layer_spec import gpt_layer_spec  # noqa: E402
from fastmath_nemo.policy.megatron.model import (  # noqa: E402
    build_gpt_model,
    load_hf_weights,
)
from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel, init_model_parallel  # noqa: E402

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
]
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    init_model_parallel(1, 1, seed=0)
    yield
    destroy_model_parallel()


def _megatron(hf, backend: str):
    cfg = hf.config
    tcfg = transformer_config_from_hf(cfg)
    model = build_gpt_model(cfg, tcfg, gpt_layer_spec(backend, tcfg.qk_layernorm)).eval()
    load_hf_weights(model, hf.state_dict(), cfg)
    return model


@pytest.fixture(scope="module", params=MODEL_TYPES)
def hf_model(request):
    return tiny_hf_model(request.param)


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_logits_match_hf(hf_model, backend: str) -> None:
    model = _megatron(hf_model, backend)
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        ours, ref = model(ids, positions, None), hf_model(ids).logits
    assert ours.shape == ref.shape == (2, 16, hf_model.config.vocab_size)
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_packed_row_matches_documents_run_separately(hf_model, backend: str) -> None:
    """Two documents in one row (per-document causal mask, positions restarting at 0) give the
    logits of each document run alone through HF."""
    model = _megatron(hf_model, backend)
    doc_ids = packed_row(16, first_doc=6)
    ids = torch.randint(0, hf_model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
    with torch.no_grad():
        ours = model(ids, positions, megatron_attention_mask(doc_ids))
        ref = torch.cat([hf_model(ids[:, :6]).logits, hf_model(ids[:, 6:]).logits], dim=1)
        unmasked = model(ids, positions, None)
    assert (ours - ref).abs().max().item() < TOL
    assert (unmasked[:, 6:] - ref[:, 6:]).abs().max().item() > 1e-2  # the mask matters


def test_thd_packed_rows_match_documents_run_separately(hf_model) -> None:
    """Two rows flattened into megatron's thd format (segments by cu_seqlens, RoPE restarting
    per segment; the format Transformer Engine's attention takes), here through the SDPA
    core attention: every document's logits are HF's for that document alone."""
    from fastmath_nemo.policy.megatron.thd import thd_params

    model = _megatron(hf_model, "sdpa")
    document_ids = torch.tensor([[1] * 6 + [2] * 10, [1] * 11 + [0] * 5])
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    params = thd_params(document_ids)
    assert params.cu_seqlens_q.tolist() == [0, 6, 16, 27, 32] and params.max_seqlen_q == 11
    with torch.no_grad():
        ours = model(ids.reshape(1, -1), None, None, packed_seq_params=params).reshape(2, 16, -1)
        refs = [hf_model(ids[:1, :6]).logits, hf_model(ids[:1, 6:]).logits, hf_model(ids[1:, :11]).logits]
    assert (ours[0, :6] - refs[0][0]).abs().max().item() < TOL
    assert (ours[0, 6:] - refs[1][0]).abs().max().item() < TOL
    assert (ours[1, :11] - refs[2][0]).abs().max().item() < TOL


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ],
)
def test_rope_scaling_matches_hf(rope: dict) -> None:
    hf = tiny_hf_model("llama", rope_parameters={"rope_theta": 500000.0, **rope})
    model = _megatron(hf, "sdpa")
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, ref = model(ids, torch.arange(24)[None], None), hf(ids).logits
        plain = tiny_hf_model("llama")(ids).logits
    assert (ours - ref).abs().max().item() < TOL
    assert (plain - ref).abs().max().item() > 1e-4  # the scaling changes the model


def test_sdpa_float_mask_equals_bool_mask() -> None:
    """SDPAAttention takes megatron's bool mask (True = blocked) or an additive float mask."""
    hf = tiny_hf_model("qwen2")
    model = _megatron(hf, "sdpa")
    doc_ids = packed_row(12)
    blocked = megatron_attention_mask(doc_ids)
    additive = torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(model(ids, positions, blocked), model(ids, positions, additive))


def test_load_hf_weights_from_a_saved_folder(tmp_path) -> None:
    """A save_pretrained folder (safetensors; the tied lm_head is not stored) loads lazily."""
    hf = tiny_hf_model("qwen3")
    hf.save_pretrained(tmp_path)
    cfg = hf.config
    tcfg = transformer_config_from_hf(cfg)
    model = build_gpt_model(cfg, tcfg, gpt_layer_spec("sdpa", tcfg.qk_layernorm)).eval()
    load_hf_weights(model, tmp_path, cfg)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(ids, torch.arange(8)[None], None) - hf(ids).logits).abs().max().item() < TOL


def test_gradients_match_hf(hf_model) -> None:
    """Backward through megatron gives HF's gradients (mapped back with mcore_to_hf)."""
    from fastmath_nemo.policy.megatron.convert import mcore_to_hf

    model = _megatron(hf_model, "sdpa")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    model(ids, torch.arange(12).expand(2, 12), None).logsumexp(-1).mean().backward()
    hf_model.zero_grad()
    hf_model(ids).logits.logsumexp(-1).mean().backward()
    ours = mcore_to_hf([{k: p.grad for k, p in model.named_parameters()}], hf_model.config, pp_rank=0, pp_size=1)
    ref = {k: p.grad for k, p in hf_model.named_parameters()}
    assert ours.keys() == ref.keys()
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) < 1e-6
    hf_model.zero_grad(set_to_none=True)
