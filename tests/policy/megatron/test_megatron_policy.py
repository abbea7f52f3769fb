"""MegatronPolicy against TorchPolicy on the same weights (one process, TP = PP = 1, CPU):
the same logprobs, and one SFT and one GRPO optimizer step give the same loss and weights."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

sys.path.insert(0, str(Path(__file__).parent))
from _megatron_tiny import OPTIMIZER, max_abs_diff, packed_rows, sft_rows, tiny_hf_model  # noqa: E402

from fastmath_nemo.algorithms.losses import GRPOLossConfig, grpo_loss, sft_loss  # noqa: E402
from fastmath_nemo.batching.batch import batch_from_sequences  # noqa: E402
from fastmath_nemo.config.schema import MegatronConfig  # noqa: E402
from fastmath_nemo.policy.optimization import NonFiniteLossError  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402



@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def policies(request, tmp_path_factory):
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    model_type = request.param
    folder = tmp_path_factory.mktemp(model_type)
    tiny_hf_model(model_type).save_pretrained(str(folder))
    megatron = MegatronPolicy(folder, MegatronConfig(attention_backend="sdpa"), temperature=0.7)
    torch_policy = TorchPolicy(tiny_hf_model(model_type), torch.device("cpu"), temperature=0.7)
    return megatron, torch_policy


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (12, 9, 15, 7)]
    masks = [[0] * 3 + [1] * (len(s) - 3) for s in seqs]
    return batch_from_sequences(seqs, masks, pad_id=0)


def _max_weight_diff(megatron, torch_policy) -> float:
    mine = dict(megatron.export_weights())
    theirs = dict(torch_policy.model.named_parameters())
    assert mine.keys() == theirs.keys()
    return max_abs_diff(mine, theirs)


def _tokens(batch) -> torch.Tensor:
    return batch.document_ids > 0  # padding's logprobs are never used (and differ by mask convention)


def test_logprobs_match_the_pytorch_policy(policies, batch):
    megatron, torch_policy = policies
    ours, theirs = megatron.logprobs(batch), torch_policy.logprobs(batch)
    assert ours.shape == theirs.shape == batch.input_ids.shape
    assert (ours - theirs)[_tokens(batch)].abs().max() <= 1e-5


def test_one_sft_step_gives_the_same_loss_and_weights(policies, batch):
    megatron, torch_policy = policies
    assert _max_weight_diff(megatron, torch_policy) == 0.0
    for policy in policies:
        policy.setup_optimizer(OPTIMIZER, total_steps=10)
    micro = [batch.select(slice(0, 2)), batch.select(slice(2, 4))]
    ours, theirs = megatron.train_step(micro, sft_loss), torch_policy.train_step(micro, sft_loss)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)
    assert ours["grad_norm"] > OPTIMIZER.max_grad_norm  # clipping took part
    assert _max_weight_diff(megatron, torch_policy) <= 1e-5

    # ... and one GRPO step after it, against old logprobs, with the KL term off
    gen = torch.Generator().manual_seed(1)
    grpo_batch = batch.with_fields(advantages=torch.randn(batch.num_rows, generator=gen),
                                   old_logprobs=torch_policy.logprobs(batch))
    loss_fn = functools.partial(grpo_loss, cfg=GRPOLossConfig(beta=0.0, eps_low=0.2, eps_high=0.28))
    micro = [grpo_batch.select(slice(0, 2)), grpo_batch.select(slice(2, 4))]
    ours, theirs = megatron.train_step(micro, loss_fn), torch_policy.train_step(micro, loss_fn)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert ours["lr"] == pytest.approx(theirs["lr"])
    assert _max_weight_diff(megatron, torch_policy) <= 1e-5
    assert (megatron.logprobs(batch) - torch_policy.logprobs(batch))[_tokens(batch)].abs().max() <= 1e-5


def test_thd_format_gives_the_same_logprobs_and_step(tmp_path):
    """The thd path (how the Transformer Engine spec receives rows, thd.py), run here through
    the SDPA core attention: packed and padded rows, and one SFT step, as the PyTorch policy."""
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    tiny_hf_model("qwen2").save_pretrained(str(tmp_path))
    policy = MegatronPolicy(tmp_path, MegatronConfig(attention_backend="sdpa"), temperature=0.7)
    policy.packed_format = "thd"
    reference = TorchPolicy(tiny_hf_model("qwen2"), torch.device("cpu"), temperature=0.7)
    packed = packed_rows()
    assert (policy.logprobs(packed) - reference.logprobs(packed))[_tokens(packed)].abs().max() <= 1e-5
    _, micro = sft_rows()
    for p in (policy, reference):
        p.setup_optimizer(OPTIMIZER, total_steps=10)
    ours, theirs = policy.train_step(micro, sft_loss), reference.train_step(micro, sft_loss)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert _max_weight_diff(policy, reference) <= 1e-5


def test_non_finite_loss_stops_before_the_update(policies, batch):
    megatron, _ = policies
    megatron.setup_optimizer(OPTIMIZER, total_steps=10)
    before = dict(megatron.export_weights())

    def nan_loss(logprobs, micro):
        loss = (logprobs * micro.loss_mask).sum() * float("nan")
        return loss, {"loss": loss.detach()}

    with pytest.raises(NonFiniteLossError):
        megatron.train_step([batch], nan_loss)
    after = dict(megatron.export_weights())
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_padded_vocabulary_is_left_out_of_the_softmax():
    from fastmath_nemo.policy.megatron.cpu_compat import enable_cpu_compat
    from fastmath_nemo.policy.megatron.parallel import init_model_parallel
    from fastmath_nemo.policy.megatron.policy import token_logprobs

    enable_cpu_compat()
    init_model_parallel(1, 1, seed=0)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, generator=gen)  # 8 = a vocabulary of 6 padded for TP
    ids = torch.randint(0, 6, (2, 5), generator=gen)
    want = torch.log_softmax(logits[:, :-1, :6], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    got = token_logprobs(logits.clone(), ids, vocab_size=6, temperature=1.0)
    torch.testing.assert_close(got[:, 1:], want)
    assert torch.equal(got[:, 0], torch.zeros(2))


@pytest.mark.parametrize(
    ("attention", "impl", "has_te", "spec"),
    [("auto", "auto", False, "sdpa"), ("auto", "auto", True, "te"), ("auto", "local", True, "sdpa"),
     ("unfused", "auto", True, "unfused"), ("sdpa", "transformer_engine", True, "te")],
)
def test_the_layer_spec_follows_attention_backend_and_transformer_impl(monkeypatch, attention, impl, has_te, spec):
    import importlib.util

    from fastmath_nemo.policy.megatron.layer_spec import resolve_attention_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if has_te else None) if name == "transformer_engine" else real(name, *a))
    assert resolve_attention_backend(attention, impl) == spec
