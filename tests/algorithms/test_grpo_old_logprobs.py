"""The pre-update ("old") logprob forward of run_grpo is taken only where it is needed (issue 12.5).

With one update per batch and no TIS the PPO ratio is exactly 1, so the loop skips the forward
and grpo_loss divides by the detached current logprobs; several updates, TIS and steps that log
the mismatch metric keep it. Scripted rollouts (tests/algorithms/_scripted.py), tiny model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastmath_nemo.generation.torch_generator import TorchGenerator
from fastmath_nemo.policy.torch_policy import TorchPolicy
from tests.algorithms._scripted import GEN, ScriptedGenerator, grpo_config, run, scripted_completions


def counted_policy(task) -> tuple[TorchPolicy, list[int], list[dict[str, torch.Tensor]]]:
    """A policy whose ``logprobs`` calls are counted and whose gradient at every backward is
    kept (name -> grad, one dict per micro-batch backward; the loop trains one micro-batch)."""
    model = task.varied_model(seed=3, std=0.1)
    policy = TorchPolicy(model, torch.device("cpu"), temperature=1.0)
    calls, grads = [0], []
    real = policy.logprobs

    def logprobs(batch):
        calls[0] += 1
        return real(batch)

    def keep(name: str, param: torch.Tensor) -> None:
        if not grads or name in grads[-1]:
            grads.append({})
        grads[-1][name] = param.grad.detach().clone()

    policy.logprobs = logprobs
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: keep(name, p))
    return policy, calls, grads


@pytest.mark.parametrize(
    ("overrides", "forwards", "logged_steps"),
    [
        (dict(mismatch_every_steps=0), 0, []),
        (dict(mismatch_every_steps=2), 2, [1, 3]),  # steps 1 and 3 log the mismatch
        (dict(mismatch_every_steps=0, updates_per_batch=2), 3, []),
        (dict(mismatch_every_steps=0, tis_cap=2.0), 3, []),
    ],
)
def test_old_logprob_forwards_per_step(tiny_task, tmp_path: Path, overrides, forwards, logged_steps) -> None:
    policy, calls, _ = counted_policy(tiny_task)
    cfg = grpo_config(steps=3, **overrides)
    records = run(policy, tiny_task.tokenizer, cfg, tmp_path, ScriptedGenerator(scripted_completions(tiny_task.tokenizer)))
    assert calls[0] == forwards
    assert [r["step"] for r in records if "rollout/logprob_diff_max" in r] == logged_steps
    assert all(r["timing/logprobs_s"] >= 0 and r["timing/scoring_s"] > 0 for r in records)


def test_skipping_the_forward_keeps_the_gradient(tiny_task, tmp_path: Path) -> None:
    """The first step's gradient with the separate forward (mismatch logged) and without it."""
    steps = {}
    for every in (1, 0):
        policy, calls, grads = counted_policy(tiny_task)
        run(policy, tiny_task.tokenizer, grpo_config(steps=1, mismatch_every_steps=every), tmp_path / str(every),
            ScriptedGenerator(scripted_completions(tiny_task.tokenizer)))
        assert calls[0] == every and len(grads) == 1
        steps[every] = grads[0]
    assert steps[1].keys() == steps[0].keys()
    assert max(float(g.abs().max()) for g in steps[0].values()) > 1e-3  # advantages are +-0.71: not a zero gradient
    for name, grad in steps[0].items():
        torch.testing.assert_close(grad, steps[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_tis_weights_are_one_under_truncated_sampling(tiny_task, tmp_path: Path) -> None:
    """The PyTorch sampler at the recipe's top_p 0.9 / min_p 0.05 (GEN) with TIS on: rollout
    logprobs are the trainer's distribution, so the weights exp(old - rollout) are 1 up to fp32
    rounding. With the truncated logprobs they were the kept mass per token (below 1)."""
    policy, _, _ = counted_policy(tiny_task)
    generator = TorchGenerator(policy.model, tiny_task.pad_id)
    (record,) = run(policy, tiny_task.tokenizer, grpo_config(steps=1, tis_cap=2.0), tmp_path, generator)
    assert GEN.top_p < 1.0 and GEN.min_p > 0.0
    assert record["completion/mean_tokens"] > 5
    assert record["rollout/logprob_diff_max"] <= 1e-5
    assert record["tis_weight_mean"] == pytest.approx(1.0, abs=1e-5)
