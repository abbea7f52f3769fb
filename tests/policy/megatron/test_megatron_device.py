"""The Megatron backend on this machine's device: one CUDA GPU where there is one (the GPU
check, tests/gpu/megatron_gpu_check.sh, runs this file with CUDA visible), else the CPU.

On a GPU this is megatron-core as is (no ``cpu_compat`` redirection), NCCL and CUDA kernels;
on both: bf16 with fp32 main weights, a distributed checkpoint round trip with either
optimizer, and, where Transformer Engine is installed, its layer spec (rows in the thd
format) and FP8. The reference is the PyTorch backend on the CPU, in fp32.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

sys.path.insert(0, str(Path(__file__).parent))
from _megatron_tiny import (  # noqa: E402
    OPTIMIZER,
    logprob_diff,
    max_abs_diff,
    packed_rows,
    sft_rows,
    tiny_hf_model,
    weight_diff,
)

from fastmath_nemo.algorithms.losses import sft_loss  # noqa: E402
from fastmath_nemo.config.schema import MegatronConfig  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402

HAS_TE = importlib.util.find_spec("transformer_engine") is not None
needs_te = pytest.mark.skipif(not HAS_TE, reason="needs Transformer Engine")
needs_fp8 = pytest.mark.skipif(not (HAS_TE and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                               reason="needs Transformer Engine and an FP8 GPU (compute capability >= 8.9)")
# CUDA kernels (fp32, no TF32) against the CPU: rounding only; TE's fused kernels a bit more.
TOL, TE_TOL = 1e-4, 2e-3
ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen2")
    tiny_hf_model("qwen2").save_pretrained(str(path))
    return path


def _policy(folder: Path, dtype: torch.dtype = torch.float32, **cfg):
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    return MegatronPolicy(folder, MegatronConfig(**{"attention_backend": "sdpa", **cfg}), temperature=0.7,
                          params_dtype=dtype)


def _reference() -> TorchPolicy:
    return TorchPolicy(tiny_hf_model("qwen2"), torch.device("cpu"), temperature=0.7)


def _parity(policy, tol: float) -> None:
    """Logprobs of padded and packed rows, then one SFT step, against the CPU PyTorch policy."""
    reference = _reference()
    batch, micro = sft_rows()
    assert logprob_diff(policy, reference, batch) <= tol
    assert logprob_diff(policy, reference, packed_rows()) <= tol
    for p in (policy, reference):
        p.setup_optimizer(OPTIMIZER, total_steps=10)
    ours, theirs = policy.train_step(micro, sft_loss), reference.train_step(micro, sft_loss)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=tol)
    assert weight_diff(policy, reference) <= tol


def test_fp32_matches_the_cpu_pytorch_policy(folder: Path) -> None:
    from fastmath_nemo.policy.megatron.cpu_compat import cpu_compat_enabled

    policy = _policy(folder)
    assert cpu_compat_enabled() is not ON_GPU  # the redirections exist for CPU runs only
    assert all(p.is_cuda is ON_GPU for p in policy.model.parameters())
    _parity(policy, TOL)


def test_bf16_training_lowers_the_loss_with_fp32_main_weights(folder: Path) -> None:
    policy = _policy(folder, torch.bfloat16)
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    policy.setup_optimizer(OPTIMIZER, total_steps=10)
    _, micro = sft_rows()
    losses = [policy.train_step(micro, sft_loss)["loss"] for _ in range(5)]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    main_weights = [p for inner in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])
                    for group in inner.optimizer.param_groups for p in group["params"]]
    assert main_weights and all(p.dtype == torch.float32 for p in main_weights)


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_checkpoint_round_trip_resumes_training(folder: Path, tmp_path: Path, distributed_optimizer: bool) -> None:
    """Saved after one step and loaded into a fresh policy: the same logprobs, and the same
    weights after one more step on both."""
    _, micro = sft_rows()
    first = _policy(folder, distributed_optimizer=distributed_optimizer)
    first.setup_optimizer(OPTIMIZER, total_steps=10)
    first.train_step(micro, sft_loss)
    (tmp_path / "ckpt").mkdir()
    first.save(tmp_path / "ckpt", extra_state={"step": 1})

    second = _policy(folder, distributed_optimizer=distributed_optimizer)
    second.setup_optimizer(OPTIMIZER, total_steps=10)
    assert second.load(tmp_path / "ckpt")["step"] == 1
    batch, _ = sft_rows()
    assert torch.equal(first.logprobs(batch), second.logprobs(batch))
    first.train_step(micro, sft_loss)
    second.train_step(micro, sft_loss)
    assert max_abs_diff(dict(first.export_weights()), dict(second.export_weights())) <= 1e-6


@needs_te
def test_transformer_engine_spec_matches_the_cpu_pytorch_policy(folder: Path) -> None:
    policy = _policy(folder, attention_backend="te")
    assert policy.packed_format == "thd"  # TE's kernels get packed rows as cu_seqlens
    _parity(policy, TE_TOL)


@needs_fp8
def test_fp8_training_follows_bf16(folder: Path) -> None:
    """Five steps in FP8 (hybrid, delayed scaling) stay within a few percent of bf16's losses.
    FP8 GEMMs want token counts in multiples of 16: rows are padded to 16 tokens."""
    _, micro = sft_rows()
    micro = [m.padded_to(m.num_rows, 16) for m in micro]
    losses = {}
    for name, extra in (("bf16", {}), ("fp8", {"fp8": "hybrid", "fp8_recipe": "delayed"})):
        policy = _policy(folder, torch.bfloat16, attention_backend="te", **extra)
        policy.setup_optimizer(OPTIMIZER, total_steps=10)
        losses[name] = [policy.train_step(micro, sft_loss)["loss"] for _ in range(5)]
    assert losses["fp8"][-1] < losses["fp8"][0]
    for fp8, bf16 in zip(losses["fp8"], losses["bf16"]):
        assert fp8 == pytest.approx(bf16, rel=0.05), losses
