"""Optional metric sinks beside ``metrics.jsonl`` (``run.loggers``): TensorBoard and Weights &
Biases (offline). Every record the :class:`~fastmath_nemo.utils.metrics_logger.MetricsLogger`
writes reaches them with the same names, prefixed by the stage, since SFT and GRPO both log
``loss`` and count steps from 1: ``grpo/reward/mean`` at step 12, ``sft/loss`` at step 300.
Strings and missing values are not scalars and stay in metrics.jsonl only.

Only rank 0 builds sinks (the logger is disabled elsewhere). Validation (``preflight``) fails
at start-up, with the install command, when a configured sink's package is missing
(:func:`sink_error`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

SINK_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def sink_error(name: str) -> str | None:
    """Why sink ``name`` cannot be built here (its package is missing), or None."""
    if name in SINK_INSTALL and importlib.util.find_spec(name) is None:
        return f"{name} is not installed: {SINK_INSTALL[name]}"
    return None


class MetricSink(Protocol):
    def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _numbers(stage: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{"<stage>/<name>": value}`` for the numeric metrics (bools as 0/1)."""
    return {f"{stage}/{name}": float(value) for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, str)}


class TensorBoardSink:
    """Scalars under ``log_dir`` through ``torch.utils.tensorboard.SummaryWriter`` (which needs the
    ``tensorboard`` package), flushed per record so a live TensorBoard sees every step."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        for tag, value in _numbers(stage, metrics).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run in offline mode under ``<directory>/wandb`` (``wandb sync`` uploads
    it later). Each stage gets its own step axis (``<stage>/step``, wandb's ``define_metric``),
    as wandb's own step must only increase and every stage counts from 1."""

    def __init__(self, directory: Path, name: str, config: Mapping[str, Any]) -> None:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="fastmath_nemo", name=name, dir=str(directory), mode="offline",
                              config=dict(config))
        self.stages: set[str] = set()

    def write(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        if stage not in self.stages:
            self.stages.add(stage)
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self.run.log({f"{stage}/step": step, **_numbers(stage, metrics)})

    def close(self) -> None:
        self.run.finish()


def build_sinks(loggers: list[str], run_dir: Path, name: str, config: Mapping[str, Any]) -> list[MetricSink]:
    """The sinks ``run.loggers`` names besides ``jsonl`` (which the logger itself writes):
    TensorBoard events in ``<run_dir>/tensorboard``, an offline wandb run in ``<run_dir>/wandb``."""
    sinks: list[MetricSink] = []
    if "tensorboard" in loggers:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if "wandb" in loggers:
        sinks.append(WandbSink(run_dir, name, config))
    return sinks
