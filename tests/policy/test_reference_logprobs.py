"""The KL reference of the PyTorch policy: host weights swapped in for ``reference_logprobs``
(fastmath_nemo/policy/torch_policy.py), and a GRPO run with ``beta > 0`` that uses it."""

from __future__ import annotations

import pytest
import torch

from fastmath_nemo.algorithms.losses import sft_loss
from fastmath_nemo.config.schema import OptimizerConfig
from fastmath_nemo.data.packing import unpacked_batch
from fastmath_nemo.policy.torch_policy import TorchPolicy

CPU = torch.device("cpu")
OPT = OptimizerConfig(lr=3e-3, warmup_ratio=0.0, betas=[0.9, 0.95])


@pytest.fixture(scope="module")
def batch(tiny_task):
    return unpacked_batch(sorted(tiny_task.sft_examples(8), key=lambda e: len(e[0]))[:4], tiny_task.pad_id)


def _state(policy: TorchPolicy) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    weights = {k: v.detach().clone() for k, v in policy.model.named_parameters()}
    assert policy.optimizer is not None
    moments = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
               for s in policy.optimizer.state.values()]
    return weights, moments


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_reference_is_the_snapshot_and_training_state_is_untouched(tiny_task, batch):
    policy = TorchPolicy(tiny_task.fresh_model(), CPU, temperature=0.8)
    initial = TorchPolicy(tiny_task.fresh_model(), CPU, temperature=0.8)  # same seed: same weights
    policy.setup_optimizer(OPT, total_steps=10)
    policy.snapshot_reference()
    for _ in range(3):
        policy.train_step([batch], sft_loss)
    trained_lp = policy.logprobs(batch)
    weights, moments = _state(policy)

    ref_lp = policy.reference_logprobs(batch)

    assert torch.equal(ref_lp, initial.logprobs(batch))  # the initial weights, bit for bit
    assert (ref_lp - trained_lp).abs().max() > 1e-2  # guards: training moved the logprobs
    after_weights, after_moments = _state(policy)
    assert _same(weights, after_weights)  # training weights restored exactly
    assert len(moments) == len(after_moments) and all(_same(a, b) for a, b in zip(moments, after_moments))
    assert torch.equal(policy.logprobs(batch), trained_lp)
    # the parameters the optimizer holds are still the model's own
    held = {id(p) for g in policy.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in policy.model.parameters()}


def test_training_after_a_reference_call_is_unchanged(tiny_task, batch):
    """A policy that computed reference logprobs between steps takes the same steps as one
    that did not (weights, Adam moments and step counts all survived the swap)."""
    runs = []
    for use_reference in (True, False):
        policy = TorchPolicy(tiny_task.fresh_model(), CPU)
        policy.setup_optimizer(OPT, total_steps=10)
        policy.snapshot_reference()
        for _ in range(3):
            policy.train_step([batch], sft_loss)
            if use_reference:
                policy.reference_logprobs(batch)
        runs.append({k: v.detach().clone() for k, v in policy.model.named_parameters()})
    assert _same(runs[0], runs[1])


def test_a_failing_reference_forward_restores_the_training_weights(tiny_task, batch, monkeypatch):
    policy = TorchPolicy(tiny_task.fresh_model(), CPU)
    policy.setup_optimizer(OPT, total_steps=10)
    policy.snapshot_reference()
    policy.train_step([batch], sft_loss)
    weights, _ = _state(policy)

    def boom(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(policy, "_forward_logprobs", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        policy.reference_logprobs(batch)
    assert _same(weights, _state(policy)[0])


def test_reference_needs_a_snapshot(tiny_task, batch):
    with pytest.raises(RuntimeError, match="snapshot_reference"):
        TorchPolicy(tiny_task.fresh_model(), CPU).reference_logprobs(batch)


def test_the_snapshot_lives_on_the_host_once_per_tensor(tiny_task):
    policy = TorchPolicy(tiny_task.fresh_model(), CPU)
    policy.snapshot_reference()
    assert policy._reference is not None
    params = list(policy.model.parameters())  # the tied embedding once
    assert len(policy._reference) == len(params)
    assert all(r.device.type == "cpu" and r.data_ptr() != p.data_ptr() for r, p in zip(policy._reference, params))


def test_grpo_with_beta_uses_the_host_reference(tiny_task, tmp_path):
    """Four GRPO steps with beta > 0 and a reference kept on the host: until the first update
    the policy is the reference (KL exactly 0), after it the KL is positive."""
    from fastmath_nemo.algorithms.grpo import run_grpo
    from fastmath_nemo.batching.micro_batches import MicroBatching
    from fastmath_nemo.checkpoint.manager import CheckpointManager
    from fastmath_nemo.config.schema import GenerationConfig, GRPOConfig
    from fastmath_nemo.generation.torch_generator import TorchGenerator
    from fastmath_nemo.utils.metrics_logger import MetricsLogger, read_metrics
    from tests.conftest import SYSTEM_PROMPT

    policy = TorchPolicy(tiny_task.varied_model(seed=2, std=0.05), CPU, micro_batching=MicroBatching(rows=4))
    before = {k: v.detach().clone() for k, v in policy.model.named_parameters()}
    policy.snapshot_reference()
    generator = TorchGenerator(policy.model, tiny_task.pad_id)
    cfg = GRPOConfig(steps=4, prompts_per_step=2, num_generations=4, beta=0.5,
                     optimizer=OptimizerConfig(lr=1e-2, warmup_ratio=0.0))
    gen_cfg = GenerationConfig(max_tokens=12, top_p=1.0, min_p=0.0)
    metrics = MetricsLogger(tmp_path / "metrics.jsonl", enabled=True)
    run_grpo(policy, generator, tiny_task.tokenizer, tiny_task.train[:8], cfg, gen_cfg, SYSTEM_PROMPT,
             CheckpointManager(tmp_path / "grpo", tiny_task.tokenizer), metrics, seed=0)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("stage", "grpo") == "grpo"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["kl"] == 0.0
    # A step whose rewards are all equal has no gradient; after the first real update the
    # policy differs from the reference and the KL term sees it.
    moved = next(i for i, r in enumerate(records) if r["grad_norm"] > 0)
    assert moved < 3 and all(r["kl"] == 0.0 for r in records[: moved + 1])
    assert all(r["kl"] > 1e-6 for r in records[moved + 1 :])
    assert any(not torch.equal(v, before[k]) for k, v in policy.model.named_parameters())
