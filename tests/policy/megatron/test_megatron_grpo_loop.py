"""run_grpo on the megatron policy with the KL term (beta > 0) against its snapshot reference:
from the same weights and the same scripted rollouts (tests/algorithms/_scripted.py), its steps
are the PyTorch policy's, and the KL is 0 before the first update and positive after it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

from fastmath_nemo.config.schema import MegatronConfig  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402
from tests.algorithms._scripted import ScriptedGenerator, grpo_config, run, scripted_completions  # noqa: E402


def test_megatron_grpo_with_kl_matches_the_torch_policy(tiny_task, tmp_path: Path) -> None:
    from fastmath_nemo.policy.megatron.policy import MegatronPolicy

    cfg = grpo_config(beta=0.5)
    completions = scripted_completions(tiny_task.tokenizer)
    tiny_task.varied_model(seed=3, std=0.1).save_pretrained(str(tmp_path / "init"))
    policies = {
        "torch": TorchPolicy(tiny_task.varied_model(seed=3, std=0.1), torch.device("cpu")),
        "megatron": MegatronPolicy(tmp_path / "init", MegatronConfig(attention_backend="sdpa")),
    }
    records = {}
    for backend, policy in policies.items():
        policy.snapshot_reference()
        records[backend] = run(policy, tiny_task.tokenizer, cfg, tmp_path / backend, ScriptedGenerator(completions))

    first, second = records["megatron"]
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # the reference is the initial policy
    assert second["kl"] > 1e-4
    assert second["loss"] - second["pg_loss"] == pytest.approx(cfg.beta * second["kl"], rel=1e-4)
    for ours, theirs in zip(records["megatron"], records["torch"]):
        for key in ("loss", "pg_loss", "kl", "ratio_mean", "grad_norm", "reward/mean"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (key, ours["step"])
