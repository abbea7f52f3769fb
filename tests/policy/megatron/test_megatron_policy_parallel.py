"""MegatronPolicy on two CPU ranks (torchrun, gloo) at TP=2 (also with sequence parallelism),
PP=2, CP=2 (per-document attention and chunked logprobs, and the dense-mask, whole-row
baseline) and DP=2 (also with the distributed optimizer and activation recomputation): the
logprobs of padded and of packed rows, one SFT step's loss and updated weights, and those
after a GRPO step, are a single-process TorchPolicy's on the same rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import free_port

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

sys.path.insert(0, str(Path(__file__).parent))
from _megatron_tiny import OPTIMIZER, sft_rows, tiny_hf_model, weight_diff  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).resolve().parent / "_policy_worker.py"



def _run_worker(tmp_path: Path, tp: int, pp: int, model: str, *extra: str) -> list[dict]:
    folder, out = tmp_path / "model", tmp_path / "result.json"
    tiny_hf_model(model).save_pretrained(str(folder))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(WORKER), "--tp", str(tp), "--pp", str(pp), "--model", model, "--folder", str(folder), "--out", str(out),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text())["cases"]


@pytest.mark.parametrize(
    ("tp", "pp", "model", "flags"),
    [(2, 1, "qwen2", ()), (2, 1, "qwen3", ("--sequence-parallel",)), (1, 2, "llama", ()),
     (1, 1, "qwen3", ("--cp", "2")),
     # the baselines: the [B, 1, T / cp, T] mask and whole-row logits
     (1, 1, "qwen3", ("--cp", "2", "--packed-attention", "dense", "--logprob-chunk-tokens", "0")),
     (1, 1, "qwen3", ()), (1, 1, "qwen2", ("--distributed-optimizer", "--recompute"))],
    ids=["tp2-qwen2", "tp2-sequence-parallel-qwen3", "pp2-llama", "cp2-qwen3", "cp2-qwen3-dense-whole-rows",
         "dp2-qwen3", "dp2-qwen2-distributed-optimizer-recompute"],
)
def test_one_sft_step_matches_the_pytorch_policy(tmp_path: Path, tp: int, pp: int, model: str, flags) -> None:
    cases = _run_worker(tmp_path, tp, pp, model, *flags)
    cp = 2 if "--cp" in flags else 1
    assert len(cases) == 2 and all(c["dp"] == 2 // (tp * pp * cp) for c in cases)
    for case in cases:
        assert case["names_match"] and case["layout_matches"], case
        assert case["logprob_diff"] <= 1e-5, case
        assert case["packed_logprob_diff"] <= 1e-5, case
        assert case["grad_norm_diff"] <= 1e-5, case
        assert case["weight_diff"] <= 1e-5, case
        assert case["grpo_grad_norm_diff"] <= 1e-5, case
        assert case["grpo_weight_diff"] <= 1e-5, case
        if case["loss_diff"] is not None:
            assert case["loss_diff"] <= 1e-5, case


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_exports_to_hf(tmp_path: Path) -> None:
    """The distributed checkpoint reshards (TP=2 -> TP=1), and the Hugging Face folder that
    policy writes is the same model."""
    import torch

    from fastmath_nemo.batching.batch import batch_from_sequences
    from fastmath_nemo.config.schema import MegatronConfig
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy
    from fastmath_nemo.policy.models import load_pretrained
    from fastmath_nemo.policy.torch_policy import TorchPolicy

    saved, hf = tmp_path / "checkpoint", tmp_path / "hf"
    _run_worker(tmp_path, 2, 1, "qwen2", "--save", str(saved))
    assert (saved / "megatron").is_dir() and not list(saved.glob("*.safetensors"))  # no rank gathered the model

    at_tp1 = MegatronPolicy(saved, MegatronConfig(attention_backend="sdpa"), temperature=0.7)
    hf.mkdir()
    at_tp1.save(hf, weights_only=True)
    exported = TorchPolicy(load_pretrained(hf), torch.device("cpu"), temperature=0.7)
    policy = MegatronPolicy(tmp_path / "model", MegatronConfig(attention_backend="sdpa"), temperature=0.7)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 96, (10,), generator=gen).tolist() for _ in range(3)]
    batch = batch_from_sequences(seqs, [[1] * 10 for _ in seqs], pad_id=0)
    before = policy.logprobs(batch)  # the initial weights
    assert (before - exported.logprobs(batch)).abs().max() > 1e-4  # the step changed the model
    assert policy.load(saved)["step"] == 1
    assert (policy.logprobs(batch) - exported.logprobs(batch)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("tp", "flags"), [(2, ()), (1, ("--distributed-optimizer",))],
    ids=["tp2-to-tp1", "dp2-distributed-optimizer-to-dp1"],
)
def test_training_resumes_from_a_checkpoint_of_another_layout(tmp_path: Path, tp: int, flags) -> None:
    """Weights, Adam moments and step count saved after one step at TP=2 (or DP=2 with the
    optimizer sharded over data-parallel ranks) resume in one process: its next step is the
    PyTorch backend's second step. A missing or wrong moment or step count moves the
    weights by ~1e-4 (Adam's step is ~lr = 1e-3 per element)."""
    import torch

    from fastmath_nemo.algorithms.losses import sft_loss
    from fastmath_nemo.config.schema import MegatronConfig
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy
    from fastmath_nemo.policy.torch_policy import TorchPolicy

    saved = tmp_path / "checkpoint"
    _run_worker(tmp_path, tp, 1, "qwen2", *flags, "--save", str(saved))

    cfg = MegatronConfig(attention_backend="sdpa", distributed_optimizer="--distributed-optimizer" in flags)
    policy = MegatronPolicy(tmp_path / "model", cfg, temperature=0.7)
    policy.setup_optimizer(OPTIMIZER, total_steps=10)
    assert policy.load(saved)["step"] == 1 and policy.step == 1
    reference = TorchPolicy(tiny_hf_model("qwen2"), torch.device("cpu"), temperature=0.7)
    reference.setup_optimizer(OPTIMIZER, total_steps=10)
    _, micro = sft_rows()
    reference.train_step(micro, sft_loss)
    expected = reference.train_step(micro, sft_loss)

    ours = policy.train_step(micro, sft_loss)
    assert ours["lr"] == pytest.approx(expected["lr"], rel=1e-12)
    assert abs(ours["loss"] - expected["loss"]) <= 1e-5
    assert abs(ours["grad_norm"] - expected["grad_norm"]) <= 1e-5
    assert weight_diff(policy, reference) <= 1e-5
