"""Preemption (``fastmath_nemo.checkpoint.preemption``): a signal or the stop file stops a run at a
step boundary with a checkpoint, on every rank at the same step, and the resumed run ends
where an uninterrupted one does.

- SIGUSR1 / SIGTERM inside ``preemption_signals()`` set the flag instead of killing; the
  previous handlers come back afterwards.
- Two gloo ranks, only one signalled: both see the request at the same call.
- ``run_sft`` stopped mid-epoch and at an epoch's end (after that epoch's evaluation) saves
  that step, records it, raises ``Preempted``; ``resume=True`` gives the uninterrupted run's
  weights bit for bit.

(GRPO under Slurm with a real requeue: tests/slurm/test_slurm_launch.py.)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _preemption_ranks import two_ranks
from safetensors.torch import load_file

from fastmath_nemo.algorithms.sft import run_sft, tokenize_sft
from fastmath_nemo.batching.micro_batches import MicroBatching
from fastmath_nemo.checkpoint import preemption
from fastmath_nemo.checkpoint.atomic import is_complete, list_checkpoints
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.checkpoint.preemption import Preempted, preemption_requested, preemption_signals
from fastmath_nemo.config.schema import OptimizerConfig, SFTConfig
from fastmath_nemo.generation.base import RolloutsAbandoned
from fastmath_nemo.policy.models import build_tiny_model
from fastmath_nemo.policy.torch_policy import TorchPolicy
from fastmath_nemo.utils.metrics_logger import MetricsLogger, read_metrics

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_sets_the_flag_and_handlers_are_restored(sig: signal.Signals, monkeypatch) -> None:
    monkeypatch.delenv(preemption.STOP_FILE_ENV, raising=False)
    before = signal.getsignal(sig)
    with preemption_signals():
        assert not preemption_requested()
        os.kill(os.getpid(), sig)  # would end the process without the handler
        assert preemption_requested()
        assert preemption_requested(), "the request must stay until the run has stopped"
    assert signal.getsignal(sig) is before
    assert not preemption_requested()


def test_stop_file_requests_a_stop(tmp_path: Path, monkeypatch) -> None:
    stop = tmp_path / "stop_requested"
    monkeypatch.setenv(preemption.STOP_FILE_ENV, str(stop))
    assert not preemption_requested()
    stop.touch()
    assert preemption_requested()


def test_one_signalled_rank_stops_every_rank(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(preemption.STOP_FILE_ENV, raising=False)
    mp.spawn(two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [False, True], f"rank {rank}"


# -- run_sft: stop, record, resume ------------------------------------------------------------------
SFT = SFTConfig(epochs=2, rows_per_step=8, max_seq_len=512, packing=False, save_every_steps=0,
                eval_every_epoch=True, optimizer=OptimizerConfig(lr=3e-3, warmup_ratio=0.3))  # 3 steps per epoch


def _sft(stage: Path, task, data, *, touch_stop_in_step: int | None = None, abandon_evaluation: int | None = None,
         resume: bool = False) -> list[int]:
    """One ``run_sft`` on a fresh policy (same init); the stop file is created during step
    ``touch_stop_in_step``, or the evaluation of epoch ``abandon_evaluation`` is abandoned (as
    an evaluation's rollouts are on a stop request). Returns the epochs evaluated."""
    policy = TorchPolicy(build_tiny_model(task.model_cfg, task.tokenizer, seed=11), torch.device("cpu"),
                         micro_batching=MicroBatching(rows=4))
    if touch_stop_in_step is not None:
        calls, real_step = [0], policy.train_step

        def train_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == touch_stop_in_step:  # as a signal arriving in the middle of the step
                Path(os.environ[preemption.STOP_FILE_ENV]).touch()
            return real_step(*args, **kwargs)

        policy.train_step = train_step  # type: ignore[method-assign]
    evaluated: list[int] = []

    def evaluate(epoch: int) -> dict:
        if epoch == abandon_evaluation:
            raise RolloutsAbandoned(f"epoch {epoch}")
        evaluated.append(epoch)
        return {}

    with MetricsLogger(stage / "metrics.jsonl") as metrics:
        run_sft(policy, data, SFT, CheckpointManager(stage, task.tokenizer, 2), metrics, seed=5,
                resume=resume, on_epoch_end=evaluate)
    return evaluated


@pytest.mark.parametrize("k", [2, 3], ids=["mid_epoch", "epoch_end"])
def test_preempted_sft_saves_that_step_and_resumes_exactly(tmp_path: Path, tiny_task, monkeypatch, k: int) -> None:
    data = tokenize_sft(tiny_task.train[:24], tiny_task.tokenizer, SYSTEM_PROMPT, 512)
    monkeypatch.delenv(preemption.STOP_FILE_ENV, raising=False)
    assert _sft(tmp_path / "reference", tiny_task, data) == [1, 2]

    stop, record = tmp_path / "stop_requested", tmp_path / "preempted.json"
    monkeypatch.setenv(preemption.STOP_FILE_ENV, str(stop))
    monkeypatch.setenv(preemption.PREEMPTED_FILE_ENV, str(record))
    stage = tmp_path / "preempted"
    with pytest.raises(Preempted) as stopped:
        _sft(stage, tiny_task, data, touch_stop_in_step=k)
    assert stopped.value.step == k
    assert [s for s, _ in list_checkpoints(stage / "checkpoints")] == [k]
    assert is_complete(stopped.value.checkpoint) and not (stage / "final").exists()
    assert json.loads(record.read_text()) == {"stage": "sft", "step": k, "checkpoint": str(stopped.value.checkpoint)}
    # A stop at an epoch's last step comes after that epoch's evaluation.
    expected = [("sft", step) for step in range(1, k + 1)] + ([("sft_eval", 3)] if k == 3 else [])
    assert [(r["stage"], r["step"]) for r in read_metrics(stage / "metrics.jsonl")] == expected

    stop.unlink()  # the requeued job's stop file is a new one
    assert _sft(stage, tiny_task, data, resume=True) == ([2] if k == 3 else [1, 2])
    reference_records = [(r["stage"], r["step"]) for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")]
    assert [(r["stage"], r["step"]) for r in read_metrics(stage / "metrics.jsonl")] == reference_records
    weights = load_file(str(stage / "final" / "model.safetensors"))
    reference = load_file(str(tmp_path / "reference" / "final" / "model.safetensors"))
    assert all(torch.equal(weights[n], reference[n]) for n in reference)


# -- the CLI: exit code, record, resume ------------------------------------------------------------
@pytest.mark.slow
def test_cli_stops_with_exit_code_75_between_evaluations_and_resumes(tmp_path: Path, tiny_task) -> None:
    """``conf=eval`` with the stop file present: ``launch/run.py`` exits 75 before the first
    evaluation, recording it; ``resume=true`` without the file evaluates and reports."""
    import subprocess
    import sys

    from _cli import TINY_RECIPE

    root = Path(__file__).resolve().parents[2]
    model_dir = tmp_path / "model"  # the task's tokenizer (with its chat template) and tiny model
    tiny_task.tokenizer.save_pretrained(str(model_dir))
    tiny_task.model.save_pretrained(str(model_dir), safe_serialization=True)
    stop, record, run_dir = tmp_path / "stop_requested", tmp_path / "preempted.json", tmp_path / "run"
    stop.touch()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           preemption.STOP_FILE_ENV: str(stop), preemption.PREEMPTED_FILE_ENV: str(record)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, str(root / "launch" / "run.py"), "conf=eval", f"eval.checkpoint={model_dir}", f"run.dir={run_dir}",
           *TINY_RECIPE]

    first = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == preemption.PREEMPTED_EXIT_CODE, first.stderr[-3000:]
    assert "preempted: eval" in first.stderr
    assert json.loads(record.read_text()) == {"stage": "eval", "step": 0, "checkpoint": str(run_dir / "eval")}
    assert not (run_dir / "report.json").exists()

    stop.unlink()
    second = subprocess.run([*cmd, "resume=true"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [row["model"] for row in json.loads((run_dir / "report.json").read_text())["evaluations"]] == ["model"]
