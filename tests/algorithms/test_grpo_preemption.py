"""A stop request in the middle of a GRPO rollout: the rollout is abandoned within a few decoding
steps (not finished), the state after the last complete step is saved, and the resumed run ends
with the uninterrupted run's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastmath_nemo.algorithms.grpo import run_grpo
from fastmath_nemo.batching.micro_batches import MicroBatching
from fastmath_nemo.checkpoint import preemption
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.config.schema import GenerationConfig, GRPOConfig, OptimizerConfig, RewardSpec
from fastmath_nemo.generation.base import STOP_CHECK_STEPS
from fastmath_nemo.generation.torch_generator import TorchGenerator
from fastmath_nemo.policy.torch_policy import TorchPolicy
from fastmath_nemo.utils.metrics_logger import MetricsLogger

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
# No stop sequence: every completion runs to max_tokens, a long rollout for this model.
GEN = GenerationConfig(max_tokens=60, stop=[])
CFG = GRPOConfig(steps=4, prompts_per_step=2, num_generations=2, beta=0.0, rewards=[RewardSpec("cosine", 1.0, {"max_len": 60})],
                 optimizer=OptimizerConfig(lr=1e-2, warmup_ratio=0.0), save_every_steps=0, keep="last")


class StopDuringRollout(TorchGenerator):
    """Touches the stop file as the rollout of step ``at`` (counted from 1) starts, and keeps
    what each call returned."""

    def __init__(self, *args, stop_file: Path, at: int | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop_file, self.at, self.calls, self.returned = stop_file, at, 0, []

    def generate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.stop_file.touch()
        out = super().generate(*args, **kwargs)
        self.returned.append(out)
        return out


def _run(task, stage: Path, stop_file: Path, *, at: int | None = None, resume: bool = False):
    policy = TorchPolicy(task.varied_model(seed=4, std=0.1), torch.device("cpu"), micro_batching=MicroBatching(rows=8))
    generator = StopDuringRollout(policy.model, task.pad_id, stop_file=stop_file, at=at)
    with MetricsLogger(stage.parent / f"{stage.name}.jsonl", enabled=True) as metrics:
        final = run_grpo(policy, generator, task.tokenizer, task.train[:8], CFG, GEN, SYSTEM_PROMPT,
                         CheckpointManager(stage, task.tokenizer), metrics, seed=3, resume=resume)
    return final, generator


def test_a_stop_during_a_rollout_abandons_it_saves_the_last_step_and_resumes_exactly(
        tiny_task, one_thread, tmp_path, monkeypatch) -> None:
    stop_file = tmp_path / "stop"
    monkeypatch.setenv(preemption.STOP_FILE_ENV, str(stop_file))
    reference, _ = _run(tiny_task, tmp_path / "reference", stop_file)

    with pytest.raises(preemption.Preempted) as stopped:
        _run(tiny_task, tmp_path / "grpo", stop_file, at=3)  # during the third step's rollout
    assert stopped.value.step == 2 and stopped.value.checkpoint == tmp_path / "grpo" / "checkpoints" / "step_2"
    stop_file.unlink()

    final, resumed = _run(tiny_task, tmp_path / "grpo", stop_file, resume=True)
    assert resumed.calls == 2  # steps 3 and 4, after the checkpoint of step 2
    expected, ours = load_file(str(reference / "model.safetensors")), load_file(str(final / "model.safetensors"))
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    start = tiny_task.varied_model(seed=4, std=0.1).state_dict()
    assert any(not torch.equal(tensor, start[name]) for name, tensor in expected.items())  # GRPO moved the weights


def test_the_abandoned_rollout_stops_within_one_check_interval(tiny_task, one_thread, tmp_path, monkeypatch) -> None:
    stop_file = tmp_path / "stop"
    monkeypatch.setenv(preemption.STOP_FILE_ENV, str(stop_file))
    policy = TorchPolicy(tiny_task.varied_model(seed=4, std=0.1), torch.device("cpu"))
    generator = StopDuringRollout(policy.model, tiny_task.pad_id, stop_file=stop_file, at=1)
    with pytest.raises(preemption.Preempted) as stopped, MetricsLogger(tmp_path / "m.jsonl", enabled=True) as metrics:
        run_grpo(policy, generator, tiny_task.tokenizer, tiny_task.train[:8], CFG, GEN, SYSTEM_PROMPT,
                 CheckpointManager(tmp_path / "grpo", tiny_task.tokenizer), metrics, seed=3)
    (abandoned,) = generator.returned
    # 60 tokens if finished; the request is seen at the first check, then nothing more is decoded
    assert abandoned.abandoned and {len(t) for t in abandoned.token_ids} == {STOP_CHECK_STEPS - 1}
    assert stopped.value.step == 0 and stopped.value.checkpoint is None  # nothing trained: nothing to keep
