"""Chunked logprobs (fastmath_nemo/policy/chunked_logprobs.py, hf_logprobs.py) against the
whole-logits computation: values and gradients, odd chunk sizes, temperature, bf16 autocast,
tied and untied output heads, and the size of the largest tensor they create."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastmath_nemo.data.packing import pack_examples
from fastmath_nemo.policy.chunked_logprobs import chunked_token_logprobs
from fastmath_nemo.policy.document_attention import document_marker, enable_per_document_attention
from fastmath_nemo.policy.hf_logprobs import TokenLogprobs
from tests.policy._largest_tensor import LargestTensor

N, H, V = 37, 16, 50


def full_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """The unchunked reference: the whole ``[N, V]`` logits at once (hidden [N, H], weight [V, H],
    targets [N] -> [N])."""
    logits = torch.nn.functional.linear(hidden, weight)
    logits = logits.to(torch.promote_types(torch.float32, logits.dtype)) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None].long()).squeeze(-1)


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    # logits of std ~2, as a trained LM's: logprobs down to about -10
    hidden = (0.5 * torch.randn(N, H, generator=gen, dtype=dtype)).requires_grad_()
    weight = torch.randn(V, H, generator=gen, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen, dtype=torch.float32)  # a loss that weighs tokens unequally
    return hidden, weight, targets, upstream


def _value_and_grads(fn, hidden, weight, targets, upstream, **kw):
    hidden.grad = weight.grad = None
    out = fn(hidden, weight, targets, **kw)
    (out * upstream).sum().backward()
    return out.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_tokens", [1, 5, 8, 36, 37, 64])  # 5, 8, 36 do not divide N = 37
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_full_logits_in_fp32(chunk_tokens: int, temperature: float) -> None:
    """Within 1e-6, plus 1e-6 relative: a GEMM over 1 or 5 rows rounds differently from one over
    37 (gemv vs blocked gemm), about 1 ulp of a logprob near -10 (the float64 test below shows
    the chunking itself adds nothing)."""
    hidden, weight, targets, upstream = _inputs()
    ref = _value_and_grads(full_token_logprobs, hidden, weight, targets, upstream, temperature=temperature)
    got = _value_and_grads(chunked_token_logprobs, hidden, weight, targets, upstream,
                           temperature=temperature, chunk_tokens=chunk_tokens)
    for name, a, b in zip(("logprobs", "grad hidden", "grad weight"), got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    assert ref[0].min() < -5 and ref[2].abs().max() > 1e-2  # real logprobs, a real gradient


@pytest.mark.parametrize("chunk_tokens", [1, 5, 37])
def test_chunked_equals_full_logits_in_fp64(chunk_tokens: int) -> None:
    hidden, weight, targets, upstream = _inputs(dtype=torch.float64)
    upstream = upstream.double()
    ref = _value_and_grads(full_token_logprobs, hidden, weight, targets, upstream, temperature=0.7)
    got = _value_and_grads(chunked_token_logprobs, hidden, weight, targets, upstream,
                           temperature=0.7, chunk_tokens=chunk_tokens)
    for name, a, b in zip(("logprobs", "grad hidden", "grad weight"), got, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)


def test_temperature_is_applied() -> None:
    """Guards the test above: tempered and untempered logprobs differ, and by the right amount."""
    hidden, weight, targets, _ = _inputs()
    with torch.no_grad():
        plain = chunked_token_logprobs(hidden, weight, targets, chunk_tokens=8)
        tempered = chunked_token_logprobs(hidden, weight, targets, temperature=0.5, chunk_tokens=8)
        by_hand = torch.log_softmax((hidden @ weight.T) / 0.5, dim=-1)[torch.arange(N), targets]
    assert (plain - tempered).abs().max() > 0.1
    torch.testing.assert_close(tempered, by_hand, atol=1e-6, rtol=0)


def test_gradcheck_in_float64() -> None:
    """Finite differences, independent of the full-logits formula."""
    hidden, weight, targets, _ = _inputs(seed=3, dtype=torch.float64)
    small = (hidden[:7].detach().requires_grad_(), weight[:11].detach().requires_grad_(), targets[:7] % 11)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_token_logprobs(h, w, small[2], temperature=0.8, chunk_tokens=3), small[:2]
    )


def test_bf16_autocast_matches_full_logits_under_autocast() -> None:
    hidden, weight, targets, upstream = _inputs(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _value_and_grads(full_token_logprobs, hidden, weight, targets, upstream, temperature=0.7)
        got = _value_and_grads(chunked_token_logprobs, hidden, weight, targets, upstream,
                               temperature=0.7, chunk_tokens=6)
    fp32 = _value_and_grads(full_token_logprobs, hidden, weight, targets, upstream, temperature=0.7)
    assert got[0].dtype == torch.float32 and got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    # the bf16 matmul really ran (not silently fp32): the result is off the fp32 one
    assert (got[0] - fp32[0]).abs().max() > 1e-4


def test_only_one_chunk_of_logits_exists_at_a_time() -> None:
    n, v, chunk = 512, 4000, 64
    hidden = torch.randn(n, 8, requires_grad=True)
    weight = torch.randn(v, 8, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    with LargestTensor() as largest:
        chunked_token_logprobs(hidden, weight, targets, chunk_tokens=chunk).sum().backward()
    assert largest.numel <= chunk * v, (largest.op, largest.shape)
    with LargestTensor() as baseline:  # guards the measurement: whole logits are n x v
        full_token_logprobs(hidden, weight, targets).sum().backward()
    assert baseline.numel >= n * v


# -- through a real model ------------------------------------------------------------------------
def _tiny_lm(tied: bool) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # larger weights than the 0.02 init, so logprobs depend on the context
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.3)
    return model


def _packed_rows():
    gen = torch.Generator().manual_seed(2)
    docs = [(torch.randint(1, 96, (n,), generator=gen).tolist(), [1] * n) for n in (13, 9, 22, 5, 17)]
    return pack_examples(docs, max_len=40, pad_id=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tied", [True, False])
def test_model_gradients_equal_whole_logits(tied: bool, dtype: torch.dtype) -> None:
    """Every parameter's gradient (the tied embedding gets both its uses) is the same with the
    logits in chunks of 7 tokens (which do not divide the rows) as with whole-row logits.

    fp32: within 1e-6 of each gradient's largest entry (these gradients reach ~40, where one
    ulp is 4e-6, and the backward sums in a different order); fp64: within 1e-12 of it."""
    model = _tiny_lm(tied).to(dtype)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batch = _packed_rows()
    enable_per_document_attention(model)
    marker = document_marker(batch.document_ids)  # per-document attention: real packed rows
    weights = torch.randn(batch.input_ids[:, 1:].shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    results = []
    for chunk in (0, 7):
        model.zero_grad(set_to_none=True)
        lp = TokenLogprobs(model, temperature=0.7, chunk_tokens=chunk)(batch.input_ids, batch.position_ids, marker)
        (lp * weights * batch.loss_mask[:, 1:]).sum().backward()
        results.append((lp.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (full_lp, full_grads), (chunk_lp, chunk_grads) = results
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(chunk_lp, full_lp, atol=tol, rtol=tol)  # rtol: ~1 ulp, as above
    assert full_grads.keys() == chunk_grads.keys()
    for name in full_grads:
        scale = float(full_grads[name].abs().max())
        assert scale > 1e-3, name  # every parameter really gets a gradient
        torch.testing.assert_close(chunk_grads[name], full_grads[name], atol=tol * scale, rtol=0, msg=name)


def test_biased_output_head_is_refused() -> None:
    model = _tiny_lm(tied=False)
    model.lm_head = torch.nn.Linear(32, 96, bias=True)
    with pytest.raises(ValueError, match="bias-free"):
        TokenLogprobs(model, chunk_tokens=16)
    TokenLogprobs(model, chunk_tokens=0)  # the whole-logits path takes any head


def test_policy_train_step_never_holds_row_by_vocabulary_logits() -> None:
    """A whole TorchPolicy SFT step (forward, loss, backward, optimizer) on 2 rows of 1,024
    tokens with a 4,096-token vocabulary: with chunks of 256 tokens no tensor is larger than
    one chunk's logits (``256 x V``); with policy.logprob_chunk_tokens=0 (the baseline) the
    ``[B, T, V]`` logits appear."""
    from fastmath_nemo.algorithms.losses import sft_loss
    from fastmath_nemo.batching.batch import batch_from_sequences
    from fastmath_nemo.config.schema import OptimizerConfig
    from fastmath_nemo.policy.torch_policy import TorchPolicy

    b, t, v, chunk = 2, 1024, 4096, 256
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, v, (t,), generator=gen).tolist(), torch.randint(1, v, (t - 100,), generator=gen).tolist()]
    batch = batch_from_sequences(rows, [[1] * len(r) for r in rows], pad_id=0)
    config = Qwen2Config(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=t)
    largest = {}
    for chunk_tokens in (chunk, 0):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        policy = TorchPolicy(model, torch.device("cpu"), logprob_chunk_tokens=chunk_tokens)
        policy.setup_optimizer(OptimizerConfig(lr=1e-3, warmup_ratio=0.0), total_steps=1)
        with LargestTensor() as seen:
            metrics = policy.train_step([batch], sft_loss)
        assert metrics["loss"] == pytest.approx(torch.log(torch.tensor(float(v))).item(), rel=0.05)
        largest[chunk_tokens] = seen
    assert largest[chunk].numel <= chunk * v, (largest[chunk].op, largest[chunk].shape)
    assert largest[0].numel >= b * (t - 1) * v  # guards the measurement
