"""Per-document attention (document_attention.py) against SDPA under the dense per-document
mask it replaces: outputs and gradients, whole rows and context-parallel query chunks that
start mid-document; packed rows through the model against Hugging Face per document; a
24,000-token packed row of 12 documents trains on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

sys.path.insert(0, str(Path(__file__).parent))
from _megatron_tiny import OPTIMIZER, tiny_hf_model  # noqa: E402

from fastmath_nemo.batching.documents import blocked_attention as local_attention_mask  # noqa: E402
from fastmath_nemo.batching.documents import blocked_attention as megatron_attention_mask  # noqa: E402
from fastmath_nemo.batching.documents import segment_bounds  # noqa: E402
from fastmath_nemo.policy.megatron import document_attention as doc_attn  # noqa: E402
from fastmath_nemo.policy.megatron.context_parallel import local_positions  # noqa: E402

# different SDPA kernels (flash for is_causal, math under a mask) round differently: ~1e-7
# relative, here on values and gradients of order 1-10
TOL = 1e-5
# two rows of 16: documents of 5, 9 and padding; one of 11 and padding of 5
DOCUMENT_IDS = torch.tensor([[1] * 5 + [2] * 9 + [0] * 2, [1] * 11 + [0] * 5])


def _qkv(width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q [2, 4, width, 8], k and v [2, 2, width, 8] (GQA: two query heads per group)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, h, width, 8, generator=gen, requires_grad=True) for h in (4, 2, 2))


def _dense(q, k, v, blocked: torch.Tensor) -> torch.Tensor:
    """SDPA under megatron's bool mask [b, 1, sq, sk] (True = blocked)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked, scale=0.3, enable_gqa=True)


def _grads(out: torch.Tensor, inputs, upstream: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * upstream).sum(), inputs))


def test_segments_are_runs_of_equal_document_ids() -> None:
    assert segment_bounds(DOCUMENT_IDS) == [[(0, 5), (5, 14), (14, 16)], [(0, 11), (11, 16)]]


def test_whole_rows_equal_the_dense_mask() -> None:
    q, k, v = _qkv(16)
    real = (DOCUMENT_IDS > 0)[:, None, :, None]  # padding queries attend differently in the two
    ours = doc_attn.document_attention(q, k, v, segment_bounds(DOCUMENT_IDS), scale=0.3, enable_gqa=True)
    theirs = _dense(q, k, v, megatron_attention_mask(DOCUMENT_IDS))
    assert ours.shape == theirs.shape == (2, 4, 16, 8)
    assert ((ours - theirs) * real).abs().max() <= TOL
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)) * real
    for a, b in zip(_grads(ours, (q, k, v), upstream), _grads(theirs, (q, k, v), upstream)):
        assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("block", [1024, 3])  # 3: a chunk's piece spans several query blocks
def test_context_parallel_chunks_equal_the_local_mask(monkeypatch, block: int) -> None:
    """Each CP rank's queries (chunks of 4 of a row of 16, some starting mid-document) against
    the whole row's keys give the rows of the dense local mask's attention, gradients too."""
    monkeypatch.setattr(doc_attn, "QUERY_BLOCK", block)
    q_full, k, v = _qkv(16, seed=2)
    segments = segment_bounds(DOCUMENT_IDS)
    for rank in range(2):
        mine = local_positions(16, 2, rank)
        q = q_full[:, :, mine].detach().requires_grad_()
        real = (DOCUMENT_IDS[:, mine] > 0)[:, None, :, None]
        ours = doc_attn.document_attention(q, k, v, segments, query_positions=mine.tolist(), scale=0.3,
                                           enable_gqa=True)
        theirs = _dense(q, k, v, local_attention_mask(DOCUMENT_IDS, mine))
        assert ((ours - theirs) * real).abs().max() <= TOL
        upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3)) * real
        for a, b in zip(_grads(ours, (q, k, v), upstream), _grads(theirs, (q, k, v), upstream)):
            assert (a - b).abs().max() <= TOL


def test_packed_row_through_the_model_matches_documents_run_separately() -> None:
    """Document ids in the mask slot (the per-document path) give HF's logits of each
    document alone, as the dense mask does."""
    from fastmath_nemo.policy.megatron.config import transformer_config_from_hf
    from fastmath_nemo.policy.megatron.layer_spec import gpt_layer_spec
    from fastmath_nemo.policy.megatron.model import build_gpt_model, load_hf_weights
    from fastmath_nemo.policy.megatron.parallel import init_model_parallel

    init_model_parallel(1, 1, seed=0)
    hf = tiny_hf_model("qwen3")
    tcfg = transformer_config_from_hf(hf.config)
    model = build_gpt_model(hf.config, tcfg, gpt_layer_spec("sdpa", tcfg.qk_layernorm)).eval()
    load_hf_weights(model, hf.state_dict(), hf.config)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        ours = model(ids, positions, DOCUMENT_IDS)
        refs = [hf(ids[:1, :5]).logits[0], hf(ids[:1, 5:14]).logits[0], hf(ids[1:, :11]).logits[0]]
    assert (ours[0, :5] - refs[0]).abs().max() <= 1e-5
    assert (ours[0, 5:14] - refs[1]).abs().max() <= 1e-5
    assert (ours[1, :11] - refs[2]).abs().max() <= 1e-5


def test_a_24000_token_packed_row_of_12_documents_trains(tmp_path) -> None:
    """One SFT step on one packed row of 24,000 tokens (12 documents of 2,000): the per-document
    path never builds the 24,000 x 24,000 mask (2.3 GB of scores per head in fp32). Its
    logprobs, and the step, are those of the 12 documents as rows of their own."""
    from fastmath_nemo.algorithms.losses import sft_loss
    from fastmath_nemo.batching.batch import Batch
    from fastmath_nemo.config.schema import MegatronConfig
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    tiny_hf_model("qwen2", max_position_embeddings=2048).save_pretrained(str(tmp_path))
    policies = [MegatronPolicy(tmp_path, MegatronConfig(attention_backend="sdpa"), logprob_chunk_tokens=4096)
                for _ in range(2)]
    docs, length = 12, 2000
    document_ids = torch.arange(1, docs + 1).repeat_interleave(length)[None]
    input_ids = torch.randint(1, 96, (1, docs * length), generator=torch.Generator().manual_seed(5))
    loss_mask = torch.ones(1, docs * length)
    loss_mask[0, ::length] = 0.0  # a document's first token is never a target
    row = Batch(input_ids=input_ids, position_ids=torch.arange(length).repeat(docs)[None],
                document_ids=document_ids, loss_mask=loss_mask)
    separate = Batch(input_ids=input_ids.view(docs, length), position_ids=torch.arange(length).expand(docs, length),
                     document_ids=torch.ones(docs, length, dtype=torch.long), loss_mask=loss_mask.view(docs, length))
    targets = separate.loss_mask > 0
    packed = policies[0].logprobs(row).view(docs, length)
    assert (packed - policies[1].logprobs(separate))[targets].abs().max() <= TOL
    before = {k: v.clone() for k, v in policies[0].export_weights()}
    for policy in policies:
        policy.setup_optimizer(OPTIMIZER, total_steps=1)
    ours, theirs = policies[0].train_step([row], sft_loss), policies[1].train_step([separate], sft_loss)
    assert abs(ours["loss"] - theirs["loss"]) <= TOL and abs(ours["grad_norm"] - theirs["grad_norm"]) <= TOL
    after, expected = dict(policies[0].export_weights()), dict(policies[1].export_weights())
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-4
    assert max(float((after[k] - expected[k]).abs().max()) for k in before) <= TOL
