"""Tests for fastmath_nemo.policy.torch_policy.TorchPolicy and its LR schedule."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from fastmath_nemo.algorithms.losses import sft_loss
from fastmath_nemo.batching.batch import batch_from_sequences
from fastmath_nemo.batching.micro_batches import MicroBatching
from fastmath_nemo.batching.step_totals import step_totals
from fastmath_nemo.config.schema import OptimizerConfig
from fastmath_nemo.data.packing import pack_examples, unpacked_batch
from fastmath_nemo.policy.optimization import NonFiniteLossError, cosine_with_warmup
from fastmath_nemo.policy.torch_policy import TorchPolicy

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def examples(tiny_task):
    # short conversations keep the steps cheap
    exs = sorted(tiny_task.sft_examples(8), key=lambda e: len(e[0]))[:4]
    return exs


@pytest.fixture(scope="module")
def batch(examples, tiny_task):
    return unpacked_batch(examples, tiny_task.pad_id)


def _eval_loss(policy: TorchPolicy, batch) -> float:
    return float(sft_loss(policy.logprobs(batch), batch)[0])


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _policy(tiny_task, seed=None, lr=3e-3, warmup_ratio=0.0, total=20) -> TorchPolicy:
    policy = TorchPolicy(tiny_task.fresh_model(seed), CPU)
    policy.setup_optimizer(OptimizerConfig(lr=lr, warmup_ratio=warmup_ratio, betas=[0.9, 0.95]), total_steps=total)
    return policy


def test_tiny_model_has_the_requested_shape(tiny_task):
    model = tiny_task.model
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 2, 1)
    assert cfg.hidden_size // cfg.num_attention_heads == 32
    assert cfg.vocab_size == len(tiny_task.tokenizer)
    assert cfg.pad_token_id == tiny_task.tokenizer.pad_token_id
    assert cfg.eos_token_id == tiny_task.tokenizer.eos_token_id
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.out_features == 32  # one kv head of dim 32
    # same seed, same weights
    again = tiny_task.fresh_model()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# -- training -------------------------------------------------------------------------------
def test_sft_train_step_lowers_the_loss(tiny_task, batch):
    policy = _policy(tiny_task, lr=3e-3, warmup_ratio=0.1, total=20)  # warmup: 2 steps
    initial = _eval_loss(policy, batch)
    assert initial == pytest.approx(math.log(len(tiny_task.tokenizer)), rel=0.05)  # ~uniform at init
    lrs = []
    for _ in range(20):
        metrics = policy.train_step([batch], sft_loss)
        lrs.append(metrics["lr"])
        assert math.isfinite(metrics["grad_norm"])
    final = _eval_loss(policy, batch)
    assert final < 0.7 * initial, (initial, final)
    # warmup 2 steps of 20, then cosine to min_lr_ratio=0
    assert lrs[0] == pytest.approx(1.5e-3)
    assert lrs[1] == pytest.approx(3e-3)
    assert lrs[2] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 17 / 18)))


def test_train_step_metric_is_the_whole_step_loss(tiny_task, batch):
    """With the step's totals bound, the reported loss is the token mean of all four rows,
    not the mean of the two halves' means."""
    policy = _policy(tiny_task)
    halves = [batch.select(slice(0, 2)), batch.select(slice(2, 4))]
    expected = _eval_loss(policy, batch)
    assert abs(expected - sum(_eval_loss(policy, h) for h in halves) / 2) > 1e-4  # the two differ
    metrics = policy.train_step(halves, functools.partial(sft_loss, totals=step_totals(halves)))
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["num_tokens"] == float(batch.loss_mask.sum())


def test_micro_batches_accumulate_to_the_full_batch_step(tiny_task, batch):
    """Two micro-batches with the step's totals (as algorithms/sft.py binds them) take the
    same step as one full micro-batch."""
    halves = [batch.select(slice(0, 2)), batch.select(slice(2, 4))]
    counts = [float(h.loss_mask.sum()) for h in halves]
    assert counts[0] != counts[1]  # an unweighted mean of the halves would differ
    split, whole = _policy(tiny_task), _policy(tiny_task)
    m_split = split.train_step(halves, functools.partial(sft_loss, totals=step_totals(halves)))
    m_whole = whole.train_step([batch], sft_loss)
    assert m_split["loss"] == pytest.approx(m_whole["loss"], rel=1e-5)
    assert m_split["grad_norm"] == pytest.approx(m_whole["grad_norm"], rel=1e-4)
    torch.testing.assert_close(split.logprobs(batch), whole.logprobs(batch), atol=1e-5, rtol=0)


def test_nan_loss_raises_and_leaves_parameters_unchanged(tiny_task, batch):
    policy = _policy(tiny_task)
    before = _params(policy.model)

    def nan_loss(logprobs, b):
        return logprobs.sum() * float("nan"), {}

    with pytest.raises(NonFiniteLossError):
        policy.train_step([batch], nan_loss)
    after = _params(policy.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in policy.model.parameters())


def test_nan_in_a_later_micro_batch_leaves_no_trace(tiny_task, batch):
    """A good micro-batch already backpropagated, then a NaN one: the failed step must not
    leak its gradients (or an optimizer / scheduler step) into the next good step."""
    halves = [batch.select(slice(0, 2)), batch.select(slice(2, 4))]
    calls = {"n": 0}

    def second_is_nan(logprobs, b):
        calls["n"] += 1
        loss, metrics = sft_loss(logprobs, b)
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    failed = _policy(tiny_task)
    with pytest.raises(NonFiniteLossError):
        failed.train_step(halves, second_is_nan)
    clean = _policy(tiny_task)
    m_failed = failed.train_step(halves, sft_loss)
    m_clean = clean.train_step(halves, sft_loss)
    assert m_failed["lr"] == m_clean["lr"]
    assert m_failed["grad_norm"] == pytest.approx(m_clean["grad_norm"], rel=1e-6)
    torch.testing.assert_close(failed.logprobs(batch), clean.logprobs(batch), atol=1e-6, rtol=0)


def test_train_step_requires_optimizer(tiny_task, batch):
    policy = TorchPolicy(tiny_task.fresh_model(), CPU)
    with pytest.raises(RuntimeError, match="setup_optimizer"):
        policy.train_step([batch], sft_loss)


# -- save / load ------------------------------------------------------------------------------
def test_save_load_roundtrip_restores_weights_and_optimizer(tiny_task, batch, tmp_path):
    original = _policy(tiny_task, lr=3e-3, warmup_ratio=0.2, total=10)
    for _ in range(3):
        original.train_step([batch], sft_loss)
    original.save(tmp_path / "ckpt", extra_state={"step": 3})

    restored = TorchPolicy(tiny_task.fresh_model(seed=tiny_task.seed + 100), CPU)
    restored.setup_optimizer(OptimizerConfig(lr=3e-3, warmup_ratio=0.2, betas=[0.9, 0.95]), total_steps=10)
    assert not torch.equal(restored.logprobs(batch), original.logprobs(batch))
    extra = restored.load(tmp_path / "ckpt")
    assert extra == {"step": 3}
    assert torch.equal(restored.logprobs(batch), original.logprobs(batch))

    # Continue both: identical steps need identical Adam moments, step counts and LR schedule.
    for _ in range(2):
        m_orig = original.train_step([batch], sft_loss)
        m_rest = restored.train_step([batch], sft_loss)
        assert m_rest["lr"] == m_orig["lr"]
        assert m_rest["loss"] == pytest.approx(m_orig["loss"], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(restored.logprobs(batch), original.logprobs(batch), atol=1e-6, rtol=0)


def test_load_without_optimizer_state_would_diverge(tiny_task, batch, tmp_path):
    """Guards the test above: a policy with fresh optimizer state does take a different step."""
    original = _policy(tiny_task, lr=3e-3, total=10)
    for _ in range(3):
        original.train_step([batch], sft_loss)
    original.save(tmp_path / "ckpt")
    weights_only = TorchPolicy(tiny_task.fresh_model(), CPU)
    weights_only.load(tmp_path / "ckpt")  # no optimizer yet: weights only
    weights_only.setup_optimizer(OptimizerConfig(lr=3e-3, warmup_ratio=0.0, betas=[0.9, 0.95]), total_steps=10)
    original.train_step([batch], sft_loss)
    weights_only.train_step([batch], sft_loss)
    assert (weights_only.logprobs(batch) - original.logprobs(batch)).abs().max() > 1e-4


# -- packed batches ---------------------------------------------------------------------------
def test_packed_logprobs_equal_per_document_logprobs(tiny_task):
    exs = tiny_task.sft_examples(2, start=10)
    total = sum(len(ids) for ids, _ in exs)
    packed = pack_examples(exs, max_len=total + 5, pad_id=tiny_task.pad_id, pad_to_max_len=True)
    assert packed.num_rows == 1
    assert int(packed.document_ids.max()) == 2
    policy = TorchPolicy(tiny_task.varied_model(seed=3), CPU)
    packed_lp = policy.logprobs(packed)[0]
    for d in (1, 2):
        pos = (packed.document_ids[0] == d).nonzero().squeeze(-1)
        ids = packed.input_ids[0, pos].tolist()
        (doc_ids, doc_mask), = [e for e in exs if e[0] == ids]
        single = batch_from_sequences([doc_ids], [doc_mask], tiny_task.pad_id)
        single_lp = policy.logprobs(single)[0]
        targets = packed.loss_mask[0, pos].bool()
        assert targets.sum() > 10
        assert torch.equal(targets, single.loss_mask[0].bool())
        torch.testing.assert_close(packed_lp[pos][targets], single_lp[targets], atol=1e-5, rtol=0)


def test_packed_logprobs_differ_when_documents_see_each_other(tiny_task):
    """Guards the test above: the second document's logprobs do depend on what it can see."""
    exs = tiny_task.sft_examples(2, start=10)
    packed = pack_examples(exs, max_len=sum(len(i) for i, _ in exs), pad_id=tiny_task.pad_id)
    policy = TorchPolicy(tiny_task.varied_model(seed=3), CPU)
    as_one_doc = packed.with_fields(
        document_ids=(packed.document_ids > 0).long(),
        position_ids=torch.arange(packed.input_ids.shape[1])[None],
    )
    second = (packed.document_ids[0] == 2) & packed.loss_mask[0].bool()
    diff = (policy.logprobs(packed)[0] - policy.logprobs(as_one_doc)[0])[second].abs().max()
    assert diff > 1e-3


def test_logprobs_column_zero_and_alignment(tiny_task):
    model = tiny_task.varied_model(seed=4)
    ids = tiny_task.sft_examples(1)[0][0][:20]
    batch = batch_from_sequences([ids, ids[:12]], [[1] * 20, [1] * 12], tiny_task.pad_id)
    lp = TorchPolicy(model, CPU, micro_batching=MicroBatching(rows=1)).logprobs(batch)
    assert lp.shape == (2, 20)
    assert lp[:, 0].abs().max() == 0
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = ref[torch.arange(19), torch.tensor(ids[1:])]
    torch.testing.assert_close(lp[0, 1:], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[1, 1:12], expected[:11], atol=1e-5, rtol=0)  # right padding


# -- schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("step", "min_ratio", "expected"),
    [
        (0, 0.0, 0.1),
        (4, 0.0, 0.5),
        (9, 0.0, 1.0),
        (10, 0.0, 1.0),
        (35, 0.0, 0.5 * (1 + math.cos(math.pi / 4))),
        (60, 0.0, 0.5),
        (60, 0.2, 0.6),
        (110, 0.0, 0.0),
        (110, 0.1, 0.1),
        (500, 0.1, 0.1),  # past the end: stays at the floor
    ],
)
def test_cosine_with_warmup_hand_values(step, min_ratio, expected):
    assert cosine_with_warmup(step, total=110, warmup=10, min_ratio=min_ratio) == pytest.approx(expected)


def test_warmup_steps_from_ratio_are_not_truncated(tiny_task):
    policy = TorchPolicy(tiny_task.fresh_model(), CPU)
    policy.setup_optimizer(OptimizerConfig(lr=1.0, warmup_ratio=0.29), total_steps=100)
    assert policy.scheduler.lr_lambdas[0](0) == pytest.approx(1 / 29)


def test_cosine_without_warmup_starts_at_one():
    assert cosine_with_warmup(0, total=100, warmup=0, min_ratio=0.0) == pytest.approx(1.0)
    assert cosine_with_warmup(50, total=100, warmup=0, min_ratio=0.0) == pytest.approx(0.5)
