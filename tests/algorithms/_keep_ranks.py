"""Test helper: one gloo rank of test_grpo_keep's two-rank test, where each rank's evaluation
reports different figures (as ranks that disagreed on a float would)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

from fastmath_nemo.algorithms.checkpoint_choice import CheckpointChoice
from fastmath_nemo.config.schema import GRPOConfig
from fastmath_nemo.utils.metrics_logger import MetricsLogger


class _Awake:
    def wake(self) -> None:
        pass

    def sleep(self) -> None:
        pass


def two_ranks(rank: int, init_file: str, out_dir: str) -> None:
    """Evaluations of steps 0, 2, 4 whose figures depend on the rank; writes the history kept."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = GRPOConfig(steps=4, eval_every_steps=2, keep="last")

    def evaluate(step: int) -> dict[str, float]:
        return {"pass@1": 0.5 + 0.1 * rank, "mean_output_tokens": 100.0 - step + rank}

    choice = CheckpointChoice(cfg, evaluate, SimpleNamespace(stage_dir=Path(out_dir)),  # type: ignore[arg-type]
                              MetricsLogger(None, enabled=False))
    for step in range(5):
        choice.after_step(step, policy=None, generator=_Awake())  # type: ignore[arg-type]
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(choice.state()))
