"""Per-document attention for packed rows (fastmath_nemo/policy/document_attention.py) in the
PyTorch policy: equal to running each document alone (logprobs and gradients), equal to the dense
``[B, 1, T, T]`` mask path it replaces, no ``T x T`` tensor anywhere, and a 24,000-token packed
row of 12 documents trains on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import fastmath_nemo.policy.torch_policy as torch_policy_module
from fastmath_nemo.algorithms.losses import sft_loss
from fastmath_nemo.batching.batch import Batch, batch_from_sequences
from fastmath_nemo.config.schema import OptimizerConfig
from fastmath_nemo.data.packing import pack_examples, rows_to_batch
from fastmath_nemo.batching.documents import document_spans
from fastmath_nemo.policy.document_attention import PER_DOCUMENT_ATTENTION
from fastmath_nemo.policy.torch_policy import TorchPolicy
from tests.policy._largest_tensor import LargestTensor

CPU = torch.device("cpu")
VOCAB = 96


def _model(seed: int = 0, hidden: int = 32, layers: int = 2, max_positions: int = 256) -> Qwen2ForCausalLM:
    """A small Qwen2 (GQA: 4 query heads, 2 KV heads) whose logprobs depend on the context."""
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    return model


def _docs(lengths: list[int], seed: int = 1) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, VOCAB, (n,), generator=gen).tolist(), [0] * (n // 3) + [1] * (n - n // 3))
            for n in lengths]


def _loss_and_grads(policy: TorchPolicy, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token logprobs [B, T] and the gradient of their masked sum, weighted by the position
    within the document, so that a gradient mixing up tokens would show."""
    policy.model.zero_grad(set_to_none=True)
    lp = policy._forward_logprobs(batch)
    weight = batch.loss_mask * (1.0 + 0.01 * batch.position_ids)
    (lp * weight).sum().backward()
    return lp.detach(), {k: p.grad.clone() for k, p in policy.model.named_parameters()}


@pytest.mark.parametrize("packed_attention", ["per_document", "dense"])
def test_packed_rows_equal_each_document_alone_with_gradients(packed_attention: str) -> None:
    docs = _docs([21, 9, 30, 14, 5])
    packed = pack_examples(docs, max_len=48, pad_id=0)
    assert packed.num_rows < len(docs) and (packed.document_ids == 0).any()  # packed, and padded
    policy = TorchPolicy(_model(), CPU, temperature=0.8, packed_attention=packed_attention, logprob_chunk_tokens=16)
    packed_lp, packed_grads = _loss_and_grads(policy, packed)
    alone_grads: dict[str, torch.Tensor] = {}
    checked = 0
    for row in range(packed.num_rows):
        for doc in range(1, int(packed.document_ids[row].max()) + 1):
            sel = packed.document_ids[row] == doc
            ids = packed.input_ids[row, sel].tolist()
            (_, mask), = [d for d in docs if d[0] == ids]
            single = batch_from_sequences([ids], [mask], pad_id=0)
            lp, grads = _loss_and_grads(policy, single)
            torch.testing.assert_close(packed_lp[row, sel][1:], lp[0, 1:], atol=1e-5, rtol=0)
            for k, g in grads.items():
                alone_grads[k] = alone_grads.get(k, 0) + g
            checked += 1
    assert checked == len(docs)
    # The packed rows' loss is the sum of the documents' losses, so are the gradients.
    for k, g in packed_grads.items():
        scale = float(alone_grads[k].abs().max())
        assert scale > 1e-4, k
        torch.testing.assert_close(g, alone_grads[k], atol=1e-5 * max(1.0, scale), rtol=0, msg=k)


def test_per_document_equals_dense_masks_in_bf16_autocast() -> None:
    docs = _docs([17, 23, 8])
    packed = pack_examples(docs, max_len=64, pad_id=0, pad_to_max_len=True)
    per_doc = TorchPolicy(_model(), CPU, compute_dtype=torch.bfloat16)
    dense = TorchPolicy(_model(), CPU, compute_dtype=torch.bfloat16, packed_attention="dense")
    assert per_doc.model.config._attn_implementation == PER_DOCUMENT_ATTENTION
    a, b = per_doc.logprobs(packed), dense.logprobs(packed)
    targets = packed.loss_mask.bool()
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[targets], b[targets], atol=5e-2, rtol=0)  # bf16 rounding only


def test_padded_single_document_rows_use_per_document_attention_and_match_the_2d_mask() -> None:
    docs = _docs([25, 12, 40])
    batch = batch_from_sequences([d[0] for d in docs], [d[1] for d in docs], pad_id=0)
    per_doc = TorchPolicy(_model(), CPU)
    dense = TorchPolicy(_model(), CPU, packed_attention="dense")
    assert per_doc._attention_mask(batch.document_ids).shape == (3, 1, 1, 40)  # the O(T) marker
    real = batch.document_ids > 0
    torch.testing.assert_close(per_doc.logprobs(batch)[real], dense.logprobs(batch)[real], atol=1e-5, rtol=0)


def test_right_padded_rows_in_one_batched_call_equal_each_row_alone_with_gradients(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpacked rows of different lengths take one batched SDPA call per layer (not one per row)
    and give each row's logprobs and the summed gradients of the rows run alone."""
    docs = _docs([25, 12, 40, 7])
    batch = batch_from_sequences([d[0] for d in docs], [d[1] for d in docs], pad_id=0)
    policy = TorchPolicy(_model(), CPU, temperature=0.8)
    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.shape[0]) or sdpa(q, *a, **k))
    batch_lp, batch_grads = _loss_and_grads(policy, batch)
    assert calls == [4, 4]  # one call per layer, all four rows
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    alone_grads: dict[str, torch.Tensor] = {}
    for row, (ids, mask) in enumerate(docs):
        lp, grads = _loss_and_grads(policy, batch_from_sequences([ids], [mask], pad_id=0))
        torch.testing.assert_close(batch_lp[row, 1:len(ids)], lp[0, 1:], atol=1e-5, rtol=0)
        for k, g in grads.items():
            alone_grads[k] = alone_grads.get(k, 0) + g
    for k, g in batch_grads.items():
        scale = float(alone_grads[k].abs().max())
        torch.testing.assert_close(g, alone_grads[k], atol=1e-5 * max(1.0, scale), rtol=0, msg=k)


def test_document_spans() -> None:
    ids = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    assert document_spans(ids) == [[(0, 2), (2, 5)], [(0, 1), (1, 2), (2, 4)]]
    with pytest.raises(ValueError, match="split"):
        document_spans(torch.tensor([[1, 1, 2, 1]]))


def test_no_t_by_t_tensor_per_document_but_dense_builds_one() -> None:
    docs = _docs([100] * 4)
    packed = pack_examples(docs, max_len=400, pad_id=0)
    t = packed.width
    with LargestTensor() as per_doc:
        TorchPolicy(_model(max_positions=512), CPU, logprob_chunk_tokens=64).logprobs(packed)
    with LargestTensor() as dense:  # guards the measurement
        TorchPolicy(_model(max_positions=512), CPU, packed_attention="dense", logprob_chunk_tokens=64).logprobs(packed)
    assert dense.numel >= t * t
    # the largest per-document tensor is an MLP activation, [T, 2 * hidden]: linear in T
    assert per_doc.numel <= 64 * t < t * t / 5, (per_doc.op, per_doc.shape)


def test_a_24k_token_packed_row_of_12_documents_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """One SFT step on a packed row of 24,000 tokens (12 documents of 2,000). The dense path
    would build a 24,000^2 mask (576 M entries, 2.3 GB as fp32) and SDPA's full score matrix per
    head; here no op may create a tensor anywhere near T^2, and the dense mask builder is never
    called."""
    t, n_docs = 24_000, 12
    gen = torch.Generator().manual_seed(5)
    docs = [(torch.randint(1, VOCAB, (t // n_docs,), generator=gen).tolist(), [0] * 100 + [1] * (t // n_docs - 100))
            for _ in range(n_docs)]
    batch = rows_to_batch(docs, [list(range(n_docs))], pad_id=0)
    assert batch.input_ids.shape == (1, t) and int(batch.document_ids.max()) == n_docs

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("document_attention_mask was called")

    monkeypatch.setattr(torch_policy_module, "document_attention_mask", forbidden)
    policy = TorchPolicy(_model(hidden=32, layers=1, max_positions=2048), CPU, logprob_chunk_tokens=4096)
    policy.setup_optimizer(OptimizerConfig(lr=1e-3, warmup_ratio=0.0), total_steps=2)
    before = {k: v.detach().clone() for k, v in policy.model.named_parameters()}
    with LargestTensor() as largest:
        metrics = policy.train_step([batch], sft_loss)
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 1.0  # about log(96) at this init
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    changed = [k for k, v in policy.model.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    # Largest tensors: logits chunks (4,096 x 96) and [T, 2 * hidden] MLP activations, ~1.5 M;
    # a single document's attention scores would be 4 heads x 2,000^2 = 16 M, the row's 2.3 G.
    assert largest.numel <= 100 * t, (largest.op, largest.shape)


def test_gradient_checkpointing_recomputes_per_document_attention() -> None:
    """The recomputation in the backward sees the same document marker (it travels in the
    attention_mask slot), so checkpointed gradients equal plain ones exactly."""
    packed = pack_examples(_docs([21, 9, 30, 14, 5]), max_len=48, pad_id=0)
    grads = []
    for checkpointing in (False, True):
        model = _model()
        if checkpointing:
            model.gradient_checkpointing_enable()
        policy = TorchPolicy(model, CPU, logprob_chunk_tokens=16)
        model.train()
        (policy._forward_logprobs(packed) * packed.loss_mask).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert model.is_gradient_checkpointing
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_masked_decoding_on_the_cpu_skips_repeat_kv_with_identical_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler's KV-cache steps (a padding mask, no gradients) run GQA inside SDPA instead of
    copying the KV heads, and give exactly what transformers' sdpa gives; with gradients the
    call is transformers' own (its K / V gradients are the reference)."""
    import transformers.integrations.sdpa_attention as sdpa_module

    plain, shared = _model(), _model()
    TorchPolicy(shared, CPU)  # switches ``shared`` to per-document attention
    ids = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as the sampler's prefill
    mask[2, :7] = 0
    calls: list[int] = []
    original = sdpa_module.repeat_kv
    monkeypatch.setattr(sdpa_module, "repeat_kv", lambda x, n: calls.append(n) or original(x, n))
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=mask).logits
        repeats_plain = len(calls)
        got = shared(input_ids=ids, attention_mask=mask).logits
    assert repeats_plain > 0 and len(calls) == repeats_plain  # transformers repeats; ours does not
    real = mask.bool()
    assert torch.equal(got[real], want[real])
    shared(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert len(calls) > repeats_plain
