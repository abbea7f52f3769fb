"""The PyTorch backend's GRPO step does not depend on how its rows are split: one micro-batch,
four micro-batches of unequal widths (a token budget), or two data-parallel ranks under
torchrun (DDP, gloo) give the same gradient within 1e-6, for every loss aggregation."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli import free_port

sys.path.insert(0, str(Path(__file__).parent))
from _step_split import OPTIMIZER, budget_split, captured_gradients, loss_cfg, step_gradients, step_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "megatron"))
from _megatron_tiny import max_abs_diff, tiny_hf_model  # noqa: E402

from fastmath_nemo.algorithms.losses import grpo_loss  # noqa: E402
from fastmath_nemo.config.schema import LossAggregation as LOSS_AGGREGATIONS  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_step_split.py"


def _policy() -> TorchPolicy:
    policy = TorchPolicy(tiny_hf_model("qwen2"), torch.device("cpu"))
    policy.setup_optimizer(OPTIMIZER, total_steps=10)
    return policy


@pytest.fixture(scope="module")
def one_micro_batch() -> dict[str, dict[str, torch.Tensor]]:
    """The reference: each aggregation's gradient with all eight rows in one micro-batch."""
    policy = _policy()
    return {agg: step_gradients(policy, [step_rows()], agg)[0] for agg in LOSS_AGGREGATIONS}


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_four_unequal_micro_batches_give_the_one_batch_gradient(one_micro_batch, loss_agg: str) -> None:
    micro = budget_split(step_rows())
    assert len(micro) == 4 and len({m.width for m in micro}) == 4  # four different widths
    policy = _policy()
    grads, _ = step_gradients(policy, micro, loss_agg)
    reference = one_micro_batch[loss_agg]
    assert grads.keys() == reference.keys()
    assert max_abs_diff(grads, reference) <= 1e-6

    # Guard: what the step did before (each micro-batch normalised alone, their mean) is off
    # by orders of magnitude more than the tolerance, so the comparison above can fail.
    def mean_of_means(logprobs, batch):
        return grpo_loss(logprobs, batch, loss_cfg(loss_agg))[0] / len(micro), {}

    with captured_gradients(policy) as old:
        policy.train_step(micro, mean_of_means)
    assert max_abs_diff(old, reference) > 1e-3


def test_two_data_parallel_ranks_give_the_one_batch_gradient(tmp_path: Path, one_micro_batch) -> None:
    """torchrun, 2 ranks: each trains every other row, split by the token budget into a
    different number of micro-batches per rank (DDP syncs once, at each rank's last)."""
    out = tmp_path / "grads.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(WORKER), "--backend", "torch", "--folder", str(tmp_path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = torch.load(out, weights_only=False)
    policy = _policy()
    for loss_agg in LOSS_AGGREGATIONS:
        result = results[loss_agg]
        assert result["micro"] == [3, 2], result["micro"]  # unequal micro-batch counts per rank
        assert max_abs_diff(result["grads"], one_micro_batch[loss_agg]) <= 1e-6, loss_agg
        # the reported loss is the whole step's, as one batch's on one process
        whole = policy.train_step([step_rows()], functools.partial(grpo_loss, cfg=loss_cfg(loss_agg)))
        assert result["loss"] == pytest.approx(whole["loss"], abs=1e-6)
