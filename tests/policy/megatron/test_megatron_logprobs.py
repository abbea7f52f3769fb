"""Chunked vocab-parallel logprobs from hidden states (logprobs.py) against the whole-row logits
path, in fp32 at TP=1 (one process; TP=2 and sequence parallelism: test_megatron_logprobs_parallel.py).
Chunks of 3 or 5 tokens leave a remainder chunk, and the padded vocabulary has masked columns."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

sys.path.insert(0, str(Path(__file__).parent))
from _megatron_tiny import packed_rows, sft_rows, tiny_hf_model  # noqa: E402

from fastmath_nemo.algorithms.losses import sft_loss  # noqa: E402
from fastmath_nemo.config.schema import MegatronConfig  # noqa: E402

TOL = 1e-6


@pytest.fixture(scope="module")
def tp1():
    from fastmath_nemo.policy.megatron.cpu_compat import enable_cpu_compat
    from fastmath_nemo.policy.megatron.parallel import init_model_parallel

    enable_cpu_compat()
    init_model_parallel(1, 1, seed=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_gradients_equal_log_softmax(tp1, temperature: float) -> None:
    from fastmath_nemo.policy.megatron.logprobs import chunked_logprobs

    gen = torch.Generator().manual_seed(0)
    vocab, padded, hidden_size = 10, 12, 8  # two padding rows of the weight
    hidden = torch.randn(7, 2, hidden_size, generator=gen, requires_grad=True)  # [S, B, H]
    weight = torch.randn(padded, hidden_size, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (7, 2), generator=gen)
    upstream = torch.randn(7, 2, generator=gen)

    got = chunked_logprobs(hidden, weight, targets, vocab_size=vocab, temperature=temperature, chunk_tokens=3)
    (got * upstream).sum().backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    want = torch.log_softmax((hidden @ weight[:vocab].t()) / temperature, dim=-1).gather(-1, targets[..., None])[..., 0]
    (want * upstream).sum().backward()
    assert got.shape == (7, 2)
    assert (got - want).abs().max() <= TOL
    assert (got_grads[0] - hidden.grad).abs().max() <= TOL
    assert (got_grads[1] - weight.grad).abs().max() <= TOL
    assert float(got_grads[1][vocab:].abs().max()) == 0.0  # padding rows get no gradient
    assert float(weight.grad.abs().max()) > 1e-2  # the comparison is not between zeros


def _gradients(policy, micro_batches, loss_fn) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (megatron DDP's main_grad) of one forward-backward pass of
    the policy's own schedule, without an optimizer step."""
    policy.ddp.train()
    policy.ddp.zero_grad_buffer()
    policy._run(micro_batches, loss_fn, forward_only=False)
    return {name: p.main_grad.detach().clone() for name, p in policy.model.named_parameters()}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])  # untied, tied output weight
def test_policy_chunked_logprobs_and_gradients_equal_whole_rows(tmp_path, model_type: str) -> None:
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    tiny_hf_model(model_type).save_pretrained(str(tmp_path))
    policy = MegatronPolicy(tmp_path, MegatronConfig(attention_backend="sdpa"), temperature=0.7,
                            logprob_chunk_tokens=0)
    batch, micro = sft_rows()
    packed = packed_rows()
    whole = policy.logprobs(batch), policy.logprobs(packed)
    whole_grads = _gradients(policy, micro, sft_loss)
    policy.logprob_chunk_tokens = 5  # 26 tokens per micro-batch: chunks of 5, 5, 5, 5, 5, 1
    chunked = policy.logprobs(batch), policy.logprobs(packed)
    chunked_grads = _gradients(policy, micro, sft_loss)

    for ours, theirs in zip(chunked, whole):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= TOL
    assert chunked_grads.keys() == whole_grads.keys()
    assert max(float((chunked_grads[k] - whole_grads[k]).abs().max()) for k in whole_grads) <= TOL
    output = "embedding.word_embeddings.weight" if model_type == "qwen3" else "output_layer.weight"
    assert float(whole_grads[output].abs().max()) > 1e-3


def test_a_step_holds_no_tensor_larger_than_a_weight(tmp_path) -> None:
    """The forward and backward of one packed row (1,024 tokens, 8 documents, V = 4,096):
    with 32-token chunks and per-document attention no op creates a tensor larger than the
    output weight [V, H] (its gradient is one); the baseline (whole-row logits, dense mask)
    creates [T, V] logits."""
    from fastmath_nemo.batching.batch import Batch
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy
    from tests.policy._largest_tensor import LargestTensor

    vocab, width, docs = 4096, 1024, 8
    tiny_hf_model("qwen2", vocab_size=vocab, max_position_embeddings=width).save_pretrained(str(tmp_path))
    document_ids = torch.arange(1, docs + 1).repeat_interleave(width // docs)[None]
    row = Batch(input_ids=torch.randint(1, vocab, (1, width), generator=torch.Generator().manual_seed(0)),
                position_ids=torch.arange(width // docs).repeat(docs)[None], document_ids=document_ids,
                loss_mask=torch.ones(1, width))

    def largest(chunk: int, attention: str) -> int:
        policy = MegatronPolicy(tmp_path, MegatronConfig(attention_backend="sdpa"), logprob_chunk_tokens=chunk,
                                packed_attention=attention)
        policy.ddp.train()
        policy.ddp.zero_grad_buffer()  # outside: it zeroes the whole flat gradient buffer
        thd = policy._uses_thd([row])
        with LargestTensor() as seen:
            logprobs = policy._batch_logprobs(policy._forward(policy.ddp, row, thd), row, thd)
            (logprobs * row.loss_mask).sum().backward()
        return seen.numel

    assert largest(32, "per_document") <= vocab * 64
    assert largest(0, "dense") >= width * vocab
