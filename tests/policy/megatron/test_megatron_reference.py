"""The KL term's reference policy without a second model (TP=1, one process): host copies of the
weights swapped into the same model for the reference forward. (Two ranks at TP=2:
test_megatron_logprobs_parallel.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

sys.path.insert(0, str(Path(__file__).parent))
from _megatron_tiny import OPTIMIZER, sft_rows, tiny_hf_model  # noqa: E402

from fastmath_nemo.algorithms.losses import sft_loss  # noqa: E402
from fastmath_nemo.config.schema import MegatronConfig  # noqa: E402


def _params(policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.model.named_parameters()}


def _main_params(policy) -> list[torch.Tensor]:
    """The optimizer's fp32 main weights (under bf16: separate tensors from the model's)."""
    return [p.detach().clone() for group in policy.optimizer.optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_logprobs_are_the_snapshots_and_leave_training_untouched(tmp_path, dtype) -> None:
    """After a step, the reference logprobs are the initial weights' (bit for bit), the training
    weights and the optimizer's main weights are restored bit for bit, and the next step is
    the one a policy that never ran the reference forward takes."""
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    tiny_hf_model("qwen3").save_pretrained(str(tmp_path))  # tied embeddings: one shared tensor
    policies = [MegatronPolicy(tmp_path, MegatronConfig(attention_backend="sdpa"), temperature=0.7,
                               params_dtype=dtype, logprob_chunk_tokens=5) for _ in range(2)]
    policy, control = policies
    batch, micro = sft_rows()
    with pytest.raises(RuntimeError, match="snapshot_reference"):
        policy.reference_logprobs(batch)
    initial = policy.logprobs(batch)
    policy.snapshot_reference()
    for p in policies:
        p.setup_optimizer(OPTIMIZER, total_steps=10)
        p.train_step(micro, sft_loss)

    trained, main = _params(policy), _main_params(policy)
    after_step = policy.logprobs(batch)
    assert (after_step - initial).abs().max() > 1e-3  # the step moved the logprobs
    reference = policy.reference_logprobs(batch)
    assert torch.equal(reference, initial)
    assert all(torch.equal(trained[k], v) for k, v in _params(policy).items())
    assert all(torch.equal(a, b) for a, b in zip(main, _main_params(policy)))
    assert torch.equal(policy.logprobs(batch), after_step)

    ours, theirs = policy.train_step(micro, sft_loss), control.train_step(micro, sft_loss)
    assert ours == theirs
    expected = _params(control)
    assert all(torch.equal(expected[k], v) for k, v in _params(policy).items())
