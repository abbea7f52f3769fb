"""The PyTorch backend on one CUDA GPU (run by benchmarks/gpu_check.sh on a GPU machine).

Skipped without CUDA: the CPU suite covers the same code paths on the CPU.
"""

from __future__ import annotations


import pytest
import torch

from fastmath_nemo.algorithms.losses import sft_loss
from fastmath_nemo.batching.batch import batch_from_sequences
from fastmath_nemo.config.schema import OptimizerConfig
from fastmath_nemo.data.packing import pack_examples
from fastmath_nemo.generation.base import SamplingParams
from fastmath_nemo.generation.torch_generator import TorchGenerator
from fastmath_nemo.policy.torch_policy import TorchPolicy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_cuda_logprobs_match_cpu(tiny_task) -> None:
    model = tiny_task.varied_model(seed=3)
    batch = pack_examples(tiny_task.sft_examples(4), max_len=512, pad_id=tiny_task.pad_id)
    on_cpu = TorchPolicy(model, torch.device("cpu")).logprobs(batch)
    on_gpu = TorchPolicy(model, CUDA).logprobs(batch)  # moves the model
    mask = batch.loss_mask > 0
    assert (on_cpu[mask] - on_gpu[mask]).abs().max() < 1e-4


def test_bf16_training_step_and_sampler_parity(tiny_task) -> None:
    model = tiny_task.varied_model(seed=4)
    policy = TorchPolicy(model, CUDA, temperature=1.0, compute_dtype=torch.bfloat16)
    policy.setup_optimizer(OptimizerConfig(lr=1e-3, warmup_ratio=0.0), total_steps=10)
    batch = pack_examples(tiny_task.sft_examples(4), max_len=512, pad_id=tiny_task.pad_id)
    loss_fn = sft_loss  # one micro-batch: its own token count is the step's
    losses = [policy.train_step([batch], loss_fn)["loss"] for _ in range(5)]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32

    generator = TorchGenerator(policy.model, tiny_task.pad_id, compute_dtype=torch.bfloat16)
    prompts = tiny_task.prompts(3)
    rollouts = generator.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=0))
    sequences = [prompts[p] + t for p, t in zip(rollouts.prompt_index, rollouts.token_ids)]
    masks = [[0] * len(prompts[p]) + [1] * len(t) for p, t in zip(rollouts.prompt_index, rollouts.token_ids)]
    trainer = policy.logprobs(batch_from_sequences(sequences, masks, tiny_task.pad_id))
    diffs = [
        (trainer[i, len(prompts[p]) : len(prompts[p]) + len(lp)] - torch.tensor(lp)).abs()
        for i, (p, lp) in enumerate(zip(rollouts.prompt_index, rollouts.logprobs))
    ]
    # bf16 compute with and without a KV cache differs by rounding, not by more.
    assert torch.cat(diffs).mean() < 0.05
