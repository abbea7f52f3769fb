"""The megatron backend's GRPO step does not depend on how its rows are split: one micro-batch,
four micro-batches of unequal widths (a token budget), two data-parallel ranks, or two pipeline
stages (exchanging activations of four different shapes) give the same gradient within 1e-6,
for every loss aggregation. Gradients are compared under Hugging Face names, gathered from
megatron's ``main_grad`` buffers after the data-parallel reduction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli import free_port

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from _megatron_tiny import max_abs_diff, tiny_hf_model  # noqa: E402
from _step_split import OPTIMIZER, budget_split, step_gradients, step_rows  # noqa: E402

from fastmath_nemo.config.schema import LossAggregation as LOSS_AGGREGATIONS  # noqa: E402
from fastmath_nemo.config.schema import MegatronConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).resolve().parents[1] / "_step_split.py"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen2")
    tiny_hf_model("qwen2").save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def policy(folder):
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    policy = MegatronPolicy(folder, MegatronConfig(attention_backend="sdpa"))
    policy.setup_optimizer(OPTIMIZER, total_steps=10)
    return policy


@pytest.fixture(scope="module")
def one_micro_batch(policy) -> dict[str, dict[str, torch.Tensor]]:
    return {agg: step_gradients(policy, [step_rows()], agg)[0] for agg in LOSS_AGGREGATIONS}


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_four_unequal_micro_batches_give_the_one_batch_gradient(policy, one_micro_batch, loss_agg: str) -> None:
    micro = budget_split(step_rows())
    assert len({m.width for m in micro}) == len(micro) == 4
    grads, _ = step_gradients(policy, micro, loss_agg)
    assert grads.keys() == one_micro_batch[loss_agg].keys()
    assert max_abs_diff(grads, one_micro_batch[loss_agg]) <= 1e-6


def test_the_megatron_gradient_is_the_pytorch_backends(one_micro_batch) -> None:
    """Anchors the comparisons in this file to the PyTorch backend's gradient of the same step."""
    from fastmath_nemo.policy.torch_policy import TorchPolicy

    reference = TorchPolicy(tiny_hf_model("qwen2"), torch.device("cpu"))
    reference.setup_optimizer(OPTIMIZER, total_steps=10)
    for loss_agg in LOSS_AGGREGATIONS:
        grads, _ = step_gradients(reference, [step_rows()], loss_agg)
        assert max_abs_diff(one_micro_batch[loss_agg], grads) <= 1e-5, loss_agg


@pytest.mark.parametrize("pp", [1, 2], ids=["dp2", "pp2"])
def test_two_ranks_give_the_one_batch_gradient(tmp_path: Path, folder: Path, one_micro_batch, pp: int) -> None:
    """torchrun, 2 ranks. DP=2: each rank trains every other row, split by the token budget
    into 3 and 2 micro-batches. PP=2: both stages run the four micro-batches of different
    shapes as they are (megatron's ``variable_seq_lengths``: no padding to one shape)."""
    out = tmp_path / "grads.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(WORKER), "--backend", "megatron", "--pp", str(pp), "--folder", str(folder), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = torch.load(out, weights_only=False)
    for loss_agg in LOSS_AGGREGATIONS:
        result = results[loss_agg]
        assert result["micro"] == ([3, 2] if pp == 1 else [4, 4]), result["micro"]
        assert result["grads"].keys() == one_micro_batch[loss_agg].keys()
        assert max_abs_diff(result["grads"], one_micro_batch[loss_agg]) <= 1e-6, loss_agg
