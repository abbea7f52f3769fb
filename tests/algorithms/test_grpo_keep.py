"""GRPO's held-out evaluations and the kept checkpoint (algorithms.checkpoint_choice).

The rule on hand-made histories; then run_grpo with the tiny model, the PyTorch sampler and an
evaluation that returns chosen figures, so the kept step is known in advance: the stage's
output must hold that step's weights (snapshotted when it was evaluated), also when the run is
killed after a checkpoint and resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmath_nemo.algorithms.checkpoint_choice import KEPT_FILE, HeldoutResult, choose
from fastmath_nemo.algorithms.grpo import run_grpo
from fastmath_nemo.batching.micro_batches import MicroBatching
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.config.schema import GenerationConfig, GRPOConfig, OptimizerConfig, RewardSpec
from fastmath_nemo.generation.torch_generator import TorchGenerator
from fastmath_nemo.policy.torch_policy import TorchPolicy
from fastmath_nemo.utils.metrics_logger import MetricsLogger, read_metrics

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def H(step: int, pass_at_1: float, tokens: float) -> HeldoutResult:
    return HeldoutResult(step, pass_at_1, tokens)


def test_best_is_fewest_tokens_within_tolerance_of_step_0():
    history = [H(0, 0.90, 100.0), H(10, 0.89, 80.0), H(20, 0.87, 60.0), H(30, 0.95, 70.0), H(40, 0.70, 40.0)]
    step, reason = choose(history, "best", 0.02, last_step=40)
    # floor 0.88: steps 20 (0.87) and 40 (0.70) fail it; of 0, 10, 30 step 30 has the fewest tokens
    assert step == 30
    assert "3 of 5 evaluations" in reason and "step 20 (87.0%), step 40 (70.0%)" in reason
    assert choose(history, "best", 0.03, last_step=40)[0] == 20  # floor 0.87 admits step 20
    assert choose(history, "last", 0.02, last_step=40) == (40, "grpo.keep=last: the last step's weights")


def test_best_falls_back_to_the_start_and_breaks_ties_by_accuracy():
    # Every GRPO step lost accuracy: the stage outputs its start.
    assert choose([H(0, 0.5, 90.0), H(5, 0.4, 50.0)], "best", 0.05, last_step=5)[0] == 0
    # Equal tokens: the higher pass@1; equal both: the later step.
    assert choose([H(0, 0.5, 90.0), H(5, 0.6, 50.0), H(10, 0.55, 50.0)], "best", 0.0, last_step=10)[0] == 5
    assert choose([H(0, 0.5, 90.0), H(5, 0.6, 50.0), H(10, 0.6, 50.0)], "best", 0.0, last_step=10)[0] == 10


def test_near_equal_token_counts_go_to_the_more_accurate_step():
    # Seed 1235's held-out evaluations (128 problems x 1 sample): step 20 was 0.03 tokens
    # shorter than step 50 and 1.6 points less accurate.
    history = [H(0, 1.0, 184.77), H(10, 0.992, 97.48), H(20, 0.984, 80.84), H(30, 0.984, 80.87),
               H(40, 0.984, 80.87), H(50, 1.0, 80.87)]
    assert choose(history, "best", 0.03, last_step=50, tokens_tolerance=0.0)[0] == 20
    step, reason = choose(history, "best", 0.03, last_step=50, tokens_tolerance=0.01)
    assert step == 50
    assert "most accurate (100.0%) of the 4 evaluations within 1.0% of the fewest" in reason
    # A step more than the tolerance longer does not count as the shortest, however accurate.
    assert choose(history + [H(60, 1.0, 82.0)], "best", 0.03, last_step=60, tokens_tolerance=0.01)[0] == 50


def test_interval_rule_admits_steps_whose_interval_reaches_step_0s():
    def C(step, pass_at_1, tokens, lo, hi):
        return HeldoutResult(step, pass_at_1, tokens, (lo, hi))

    history = [C(0, 0.90, 100.0, 0.85, 0.95), C(10, 0.84, 60.0, 0.78, 0.86), C(20, 0.80, 50.0, 0.72, 0.849),
               C(30, 0.99, 70.0, 0.96, 1.0)]
    step, reason = choose(history, "best", 0.0, last_step=30, eligibility="interval")
    # step 10's [0.78, 0.86] overlaps [0.85, 0.95]; step 20's ends at 0.849, below 0.85; step 30
    # lies above: eligible are 0, 10, 30, and step 10 has the fewest tokens of them
    assert step == 10
    assert "interval reaches step 0's (85.0-95.0%)" in reason and "step 20 (80.0%)" in reason
    # the fixed tolerance of 2 points would have kept step 30 (step 10 lost 6)
    assert choose(history, "best", 0.02, last_step=30)[0] == 30
    # an evaluation recorded without an interval cannot be judged by one
    with pytest.raises(ValueError, match="keep_eligibility=tolerance"):
        choose(history + [H(40, 0.9, 40.0)], "best", 0.0, last_step=40, eligibility="interval")
    assert HeldoutResult.from_dict(history[1].to_dict()) == history[1]
    assert HeldoutResult.from_dict(H(5, 0.5, 9.0).to_dict()).ci95 is None


def test_history_must_start_at_step_0():
    with pytest.raises(AssertionError, match="step 0"):
        choose([H(5, 0.5, 10.0)], "best", 0.1, last_step=5)


# -- run_grpo --------------------------------------------------------------------------------
# (pass@1, mean tokens) the scripted evaluation reports per step: step 2 is the best (within
# 0.02 of step 0's 0.90, fewest tokens of those), step 4 has fewer tokens but lost accuracy.
FIGURES = {0: (0.90, 100.0), 2: (0.89, 60.0), 4: (0.50, 30.0)}


class ScriptedEvaluation:
    """``evaluate_heldout``: reports FIGURES[step] and snapshots the policy's weights then, and
    which kept-step candidates are on disk at that moment."""

    def __init__(self, policy: TorchPolicy, candidates: Path) -> None:
        self.policy = policy
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.candidates_dir = candidates
        self.candidates: dict[int, list[str]] = {}

    def __call__(self, step: int) -> dict[str, float]:
        self.weights[step] = {k: v.detach().clone() for k, v in self.policy.model.state_dict().items()}
        found = self.candidates_dir.iterdir() if self.candidates_dir.is_dir() else []
        self.candidates[step] = sorted(p.name for p in found)
        pass_at_1, tokens = FIGURES[step]
        return {"pass@1": pass_at_1, "mean_output_tokens": tokens}


class KilledAtCheckpoint(CheckpointManager):
    """The run is killed while writing the checkpoint of ``step`` (after that step's evaluation)."""

    def __init__(self, *args, step: int | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kill_step = step

    def save(self, policy, step, state):
        if step == self.kill_step:
            raise KeyboardInterrupt(f"killed while saving step {step}")
        return super().save(policy, step, state)


def grpo_cfg(**overrides) -> GRPOConfig:
    # cosine: completions of different lengths get different rewards, so the weights move
    settings = dict(steps=4, prompts_per_step=2, num_generations=2, beta=0.0, rewards=[RewardSpec("cosine", 1.0, {"max_len": 12})],
                    optimizer=OptimizerConfig(lr=1e-2, warmup_ratio=0.0), eval_every_steps=2, keep="best",
                    keep_tolerance=0.02, save_every_steps=0)
    settings.update(overrides)
    return GRPOConfig(**settings)


def run(task, cfg: GRPOConfig, stage_dir: Path, *, resume: bool = False, kill_at: int | None = None):
    # seed 4: some sampled completions stop before 12 tokens, so cosine rewards differ within a
    # group and the weights move (seed 3's all ran to 12 tokens once the tokenizer learned the
    # chat roles: equal rewards, no gradient, and the kept step equalled the last)
    policy = TorchPolicy(task.varied_model(seed=4, std=0.1), torch.device("cpu"), temperature=1.0,
                         micro_batching=MicroBatching(rows=8))
    generator = TorchGenerator(policy.model, task.pad_id, max_rows=8)
    evaluation = ScriptedEvaluation(policy, stage_dir / "candidates")
    checkpoints = KilledAtCheckpoint(stage_dir, task.tokenizer, cfg.keep_last_checkpoints, step=kill_at)
    # metrics.jsonl beside the stage directory (as in a run directory), so nothing but the
    # stage itself creates that directory
    with MetricsLogger(stage_dir.parent / "metrics.jsonl", enabled=True) as metrics:
        final = run_grpo(policy, generator, task.tokenizer, task.train[:4], cfg, GenerationConfig(max_tokens=12),
                         SYSTEM_PROMPT, checkpoints, metrics, seed=3, resume=resume,
                         evaluate_heldout=evaluation)
    return final, evaluation, policy


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    saved = weights_of(folder)
    assert saved and all(torch.equal(v, expected[k]) for k, v in saved.items())


def test_keep_best_outputs_the_chosen_steps_weights_and_says_why(tiny_task, one_thread, tmp_path):
    final, evaluation, policy = run(tiny_task, grpo_cfg(), tmp_path / "grpo")
    assert sorted(evaluation.weights) == [0, 2, 4]
    assert final == tmp_path / "grpo" / "final"
    assert_same_weights(final, evaluation.weights[2])
    # ... which are not the last step's (GRPO moved the weights)
    last = policy.model.state_dict()
    assert any(not torch.equal(v, last[k]) for k, v in weights_of(final).items())
    kept = json.loads((tmp_path / "grpo" / KEPT_FILE).read_text())
    assert kept["step"] == 2 and kept["of_steps"] == 4 and "step 4 (50.0%)" in kept["reason"]
    assert [e["step"] for e in kept["evaluations"]] == [0, 2, 4]
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "grpo_heldout"]
    assert [(r["step"], r["heldout/pass@1"], r["heldout/mean_tokens"]) for r in logged] == \
        [(s, *FIGURES[s]) for s in (0, 2, 4)]
    assert not (tmp_path / "grpo" / "candidates").exists()  # moved or deleted at the end


def test_a_candidate_nothing_can_choose_is_deleted_at_once(tiny_task, one_thread, tmp_path):
    # No periodic checkpoint (save_every_steps=0): once step 2 beats step 0, no run can choose
    # step 0 again (a resume would start the stage over), so its candidate goes at once.
    _, evaluation, _ = run(tiny_task, grpo_cfg(), tmp_path / "grpo")
    assert evaluation.candidates == {0: [], 2: ["step_0"], 4: ["step_2"]}


def test_keep_last_outputs_the_last_weights(tiny_task, one_thread, tmp_path):
    final, evaluation, policy = run(tiny_task, grpo_cfg(keep="last"), tmp_path / "grpo")
    assert_same_weights(final, evaluation.weights[4])
    assert json.loads((tmp_path / "grpo" / KEPT_FILE).read_text())["step"] == 4


def test_resume_keeps_the_step_chosen_before_the_kill(tiny_task, one_thread, tmp_path):
    stage = tmp_path / "grpo"
    with pytest.raises(KeyboardInterrupt):  # killed saving step 2, after its evaluation: resumes at 1
        run(tiny_task, grpo_cfg(save_every_steps=1), stage, kill_at=2)
    # step 1's checkpoint recorded the evaluation of step 0, the best then; step 2's came after
    assert sorted(p.name for p in (stage / "candidates").iterdir()) == ["step_0", "step_2"]
    final, evaluation, _ = run(tiny_task, grpo_cfg(save_every_steps=1), stage, resume=True)
    assert sorted(evaluation.weights) == [2, 4]  # 0 came from the checkpoint
    assert_same_weights(final, evaluation.weights[2])
    assert json.loads((stage / KEPT_FILE).read_text())["step"] == 2
    # each evaluation once in the metrics: the killed run's step 2 is superseded
    logged = [r for r in read_metrics(stage.parent / "metrics.jsonl") if r["stage"] == "grpo_heldout"]
    assert [r["step"] for r in logged] == [0, 2, 4]
    raw = [r for r in read_metrics(stage.parent / "metrics.jsonl", raw=True) if r["stage"] == "grpo_heldout"]
    assert [r["step"] for r in raw] == [0, 2, 2, 4]


def test_every_rank_keeps_rank_0s_evaluations(tmp_path):
    """Under torchrun rank 0's figures decide: a rank whose own summary differs still records
    rank 0's, so every rank makes the same choice and saves the same checkpoints."""
    import torch.multiprocessing as mp

    from tests.algorithms._keep_ranks import two_ranks

    mp.spawn(two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = {"heldout": [{"step": s, "pass@1": 0.5, "mean_tokens": 100.0 - s} for s in (0, 2, 4)]}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected, f"rank {rank}"
